"""Stores at every location, against real servers on loopback: an S3-API server (moto's threaded
server, reached through s3fs with dummy credentials), a Range-capable static HTTP server
(``python -m RangeHTTPServer``, a subprocess), and single ``.zarr.zip`` files. No fsspec mocks."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from typing import Callable, Iterator

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import kdcache
from kdcache.cli import main
from kdcache.errors import StoreError
from kdcache.interop import import_hdf5, pack
from kdcache.store import open_store
from kdcache.verify import verify
from conftest import S3_BUCKET, TINY_TOML, served_folder
from reference import free_port, make_pipeline, without_times

pytest.importorskip("moto.server")
pytest.importorskip("s3fs")

BUCKET = S3_BUCKET  # made by the s3 fixture


@pytest.fixture(scope="module")
def http_root(tmp_path_factory):
    """A folder served read-only by a Range-capable HTTP server on 127.0.0.1: ``(folder, base_url)``."""
    pytest.importorskip("RangeHTTPServer")
    yield from served_folder(tmp_path_factory.mktemp("www"), "RangeHTTPServer")


@pytest.fixture(scope="module")
def plain_http_root(tmp_path_factory):
    """A folder served by ``python -m http.server`` on 127.0.0.1, which ignores ``Range`` headers: ``(folder, base_url)``."""
    yield from served_folder(tmp_path_factory.mktemp("plain"), "http.server")


@contextlib.contextmanager
def _serving_in_a_thread(handler: type, root) -> Iterator[str]:
    """``root`` served by the request handler class ``handler`` (a ``SimpleHTTPRequestHandler``'s) in a thread on
    127.0.0.1 for the block: yields its base URL."""
    import functools
    import http.server

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_free_port_stays_refused_where_another_server_would_bind_it():
    """``free_port``'s port can be bound by no server but refuses every connection, for as long as the session lasts."""
    port = free_port()
    with pytest.raises(OSError, match="Address already in use"):
        socket.create_server(("127.0.0.1", port))  # as another worker's dask scheduler or HTTP server would bind it
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=10).close()


def assert_same_store(a: str, b: str, options_a=None, options_b=None) -> None:
    sa, sb = open_store(a, storage_options=options_a), open_store(b, storage_options=options_b)
    assert without_times(sa.manifest) == without_times(sb.manifest)
    assert sa.paths() == sb.paths()
    for path in sa.paths() + ["progress/done", "progress/digest"]:
        np.testing.assert_array_equal(sa.array(path)[:], sb.array(path)[:], err_msg=path)


def test_extract_to_s3_resumes_and_matches_local(s3, tmp_path, zoo_env):
    url = f"s3://{BUCKET}/resume.zarr"
    zoo_env(FAIL_AT=42)
    with pytest.raises(RuntimeError, match="simulated crash fetching index 42"):
        kdcache.extract(make_pipeline(), url, storage_options=s3)
    zoo_env(FAIL_AT=None)
    partial = open_store(url, storage_options=s3)
    assert partial.done().tolist() == [True, True, False, False] and not partial.complete
    assert partial.info()["bytes_stored"] > 0  # listed from the bucket

    info = kdcache.extract(make_pipeline(), url, storage_options=s3)
    assert info["complete"] and info["samples_done"] == 50
    local = tmp_path / "local.zarr"
    kdcache.extract(make_pipeline(), str(local))
    assert_same_store(url, str(local), options_a=s3)
    # the same objects listed from the bucket: the done rows against the done shards' objects, as from a folder
    assert info["compression_ratio"] == pytest.approx(open_store(str(local)).info()["compression_ratio"])


def test_a_dry_run_of_an_s3_out_says_what_the_run_would_do_there_and_writes_nothing(s3, zoo_env):
    """``dry_run(p, out)`` of a bucket's store: the run's own checks over S3 (new, partial, complete, --overwrite, a prefix
    of other objects), reading only; no object, not even a lock object, is put or deleted."""
    import s3fs

    fs = s3fs.S3FileSystem(**s3, skip_instance_cache=True)

    def objects() -> dict[str, str]:
        fs.invalidate_cache()
        return {info["name"]: info["ETag"] for info in fs.find(BUCKET, detail=True).values()}

    def dry(url: str, **kwargs) -> dict:
        before = objects()
        report = kdcache.dry_run(make_pipeline(), url, storage_options=s3, **kwargs)["out"]
        assert objects() == before
        return report

    url = f"s3://{BUCKET}/dry.zarr"
    assert dry(url) == {"location": url, "action": "create", "again": False, "shards_done": 0, "num_shards": 4, "redone": 0}
    assert not fs.exists(f"{BUCKET}/dry.zarr")
    zoo_env(FAIL_AT=42)
    with pytest.raises(RuntimeError, match="simulated crash fetching index 42"):
        kdcache.extract(make_pipeline(), url, storage_options=s3)
    zoo_env(FAIL_AT=None)
    partial = dry(url)
    assert (partial["action"], partial["shards_done"], partial["num_shards"]) == ("resume", 2, 4), partial
    assert kdcache.extract(make_pipeline(), url, storage_options=s3)["shards_written"] == 2  # as the dry run said
    assert dry(url)["action"] == "complete"
    assert dry(url, overwrite=True)["action"] == "replace"
    fs.pipe(f"{BUCKET}/dry-foreign/data.bin", b"not a store")
    with pytest.raises(StoreError, match="exists and is not a kdcache store"):  # the run's refusal, in its words
        dry(f"s3://{BUCKET}/dry-foreign")


@pytest.mark.slow
def test_extract_info_verify_train_through_the_cli_on_s3(s3, tmp_path, monkeypatch):
    from conftest import TINY_TOML

    url = f"s3://{BUCKET}/cli.zarr"
    # credentials from the environment, the endpoint as a storage option
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    opt = ["--storage-option", f"endpoint_url={s3['endpoint_url']}"]
    runner = CliRunner()
    r = runner.invoke(main, ["extract", str(TINY_TOML), "--out", url, "--json", *opt])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["info", url, "--json", *opt])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert info["complete"] and info["location"] == url and info["bytes_stored"] > 0
    r = runner.invoke(main, ["verify", url, *opt])
    assert r.exit_code == 0 and "verified" in r.output, r.output
    r = runner.invoke(main, ["train", str(TINY_TOML), "--cache", url, "--out", str(tmp_path / "run"), "--epochs", "1", "--json", *opt])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "run" / "student.pt").is_file()
    r = runner.invoke(main, ["info", url, "--storage-option", "endpoint_url=http://127.0.0.1:9",
                                "--storage-option", "config_kwargs.retries.max_attempts=1"])  # nothing listens there
    assert r.exit_code == 1 and r.output.startswith("Error: cannot reach") and "Traceback" not in r.output


def test_settings_given_as_a_json_object_are_added_to_those_given_under_the_same_storage_option(s3):
    """``--storage-option client_kwargs.endpoint_url=URL`` then ``client_kwargs={"region_name": ...}``: the object replaced
    the settings given before under client_kwargs, the endpoint dropped without a word, and info went to AWS's endpoint
    ("cannot reach ... s3.amazonaws.com"); in the other order both were kept. Both orders keep both; a key given a value
    and settings is still refused, naming both."""
    url = f"s3://{BUCKET}/merged-options.zarr"
    kdcache.extract(make_pipeline(), url, storage_options=s3)
    endpoint, region = f"client_kwargs.endpoint_url={s3['endpoint_url']}", 'client_kwargs={"region_name": "us-east-1"}'
    given = ["key=testing", "secret=testing", "config_kwargs.retries.max_attempts=1"]  # nothing else is tried: AWS's fails at once
    for order in ([endpoint, region], [region, endpoint]):
        r = CliRunner().invoke(main, ["info", url, *(f"--storage-option={item}" for item in [*given, *order])])
        assert r.exit_code == 0 and r.output.startswith(f"store       {url}"), (order, r.output)
    r = CliRunner().invoke(main, ["info", url, "--storage-option=client_kwargs.region_name.x=1", f"--storage-option={region}"])
    assert r.exit_code == 2 and ('client_kwargs={"region_name": "us-east-1"} would replace the settings [\'x\'] already given '
                                 "under client_kwargs.region_name") in r.output, r.output


@pytest.mark.parametrize("where", ["eval-cache-on-s3", "cache-on-s3"])
def test_train_with_one_store_local_and_the_other_on_s3_takes_the_storage_options_for_the_s3_one(s3, tiny_store, tmp_path, where):
    """A local --cache with train.eval_cache on S3 (or the reverse): the options the S3 store needs were refused by the
    local one ("storage options ['endpoint_url', …] apply to URL locations …, not the local path …"), though the run
    could not reach the S3 store without them. They are the S3 store's; the local one takes none."""
    from conftest import TINY_TOML

    url = f"s3://{BUCKET}/evaluated-{where}.zarr"
    kdcache.extract(kdcache.load_pipeline(TINY_TOML, ["data.split=test"]), url, storage_options=s3)
    local = str(tmp_path / "test.zarr")
    kdcache.extract(kdcache.load_pipeline(TINY_TOML, ["data.split=test"]), local)
    cache, evaluated = (tiny_store, url) if where == "eval-cache-on-s3" else (url.replace("evaluated", "trained"), local)
    if where == "cache-on-s3":
        kdcache.extract(kdcache.load_pipeline(TINY_TOML), cache, storage_options=s3)
    p = kdcache.load_pipeline(TINY_TOML, ["train.epochs=1", f'train.eval_cache="{evaluated}"'])
    result = kdcache.train(p, cache, tmp_path / "run", storage_options=s3)
    assert 0 < result["eval_agreement"] <= 1
    with pytest.raises(StoreError, match=r"storage options \['endpoint_url', 'key', 'secret'\] apply to URL locations .*not the local path"):
        kdcache.train(kdcache.load_pipeline(TINY_TOML, ["train.epochs=1", f'train.eval_cache="{local}"']), tiny_store,
                      tmp_path / "both-local", storage_options=s3)  # neither store takes them: still refused


def test_train_streams_from_s3_in_dataloader_workers(s3, tiny_store, tmp_path):
    """TransferSet reopens the store in each worker with the same storage options."""
    from conftest import TINY_TOML

    url = f"s3://{BUCKET}/workers.zarr"
    kdcache.extract(kdcache.load_pipeline(TINY_TOML), url, storage_options=s3)
    p = kdcache.load_pipeline(TINY_TOML, ["train.memory_budget_mb=0", "train.num_workers=2", "train.epochs=1"])
    result = kdcache.train(p, url, tmp_path / "run", storage_options=s3)
    assert result["step"] == 7 and np.isfinite(result["loss"])


def test_a_shard_missing_from_s3_is_one_line_when_dataloader_workers_read_it(s3, tmp_path, monkeypatch):
    """A shard object gone from the bucket, found by a DataLoader worker while streaming: torch re-raises a
    worker's error by calling its class with the message alone, which DamagedShardError did not take, so it reached
    the command as a RuntimeError: a 100-line traceback instead of the one "is damaged" line. (Gone once the run is
    under way: a store lacking it at the start is refused before the run begins.)"""
    import importlib

    import s3fs

    from conftest import TINY_TOML

    url = f"s3://{BUCKET}/missing-shard.zarr"
    kdcache.extract(kdcache.load_pipeline(TINY_TOML), url, storage_options=s3)
    module = importlib.import_module("kdcache.train")
    epochs = module._epochs

    def deleting(*args, **kwargs):
        s3fs.S3FileSystem(**s3, skip_instance_cache=True).rm(f"{BUCKET}/missing-shard.zarr/targets/logits/c/2/0")
        return epochs(*args, **kwargs)

    monkeypatch.setattr(module, "_epochs", deleting)
    options = [f"--storage-option={k}={v}" for k, v in s3.items()]
    r = CliRunner().invoke(main, ["train", str(TINY_TOML), "--cache", url, "--out", str(tmp_path / "run"), "--epochs", "1",
                                  "--set", "train.memory_budget_mb=0", "--set", "train.num_workers=2", *options])
    last = r.output.strip().splitlines()[-1]  # after the projection head's line
    assert r.exit_code == 1 and last.startswith(f"Error: {url!r} is damaged: shard 2 of targets/logits (rows 32-47) is missing"), r.output
    assert "Traceback" not in r.output and "Caught" not in r.output, r.output


@pytest.mark.parametrize("budget", [2048, 0], ids=["in-memory", "streaming"])
def test_train_refuses_an_s3_store_whose_done_shard_lacks_an_object_at_once_found_by_one_list_per_array(s3, tmp_path, budget):
    """A store copied to the bucket by a sync cut short (a done shard's object never arrived): train found it where it
    read the shard, streaming hours into the run with pipeline.json written. Now it is refused before the run begins, in
    one line naming the store, the shard and the object, found by one ListObjectsV2 per array the run reads (and the
    digest rows), no object asked for one by one (no HeadObject). The same store whole trains as before."""
    import s3fs

    from kdcache.storage import filesystem

    url = f"s3://{BUCKET}/cut-sync-{budget}.zarr"
    kdcache.extract(kdcache.load_pipeline(TINY_TOML), url, storage_options=s3)
    bucket, key = s3fs.S3FileSystem(**s3, skip_instance_cache=True), f"{BUCKET}/cut-sync-{budget}.zarr/samples/fingerprint/c/3"
    kept = bucket.cat(key)
    bucket.rm(key)
    fs = filesystem(url, s3)[0]  # the instance the listing uses (fsspec caches it)
    fs.ls(BUCKET)  # connected: its client exists
    calls: list[str] = []
    fs.s3.meta.events.register("before-call.s3", lambda model, **_: calls.append(model.name))
    options = [f"--storage-option={k}={v}" for k, v in s3.items()]
    args = ["train", str(TINY_TOML), "--cache", url, "--epochs", "1", "--set", f"train.memory_budget_mb={budget}", *options]
    r = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "run")])
    assert r.exit_code == 1 and r.output.splitlines() == [
        f"Error: {url!r} lacks objects of 1 shard of the 4 marked done that this run reads (an incomplete copy, or objects deleted): "
        f"shards [3], object 'samples/fingerprint/c/3' missing; copy the store again, or run kdcache extract PIPELINE --out {url}, "
        f"which resumes it and rewrites those shards; kdcache verify {url} lists every damaged object (nothing was written)"], r.output
    assert not (tmp_path / "run").exists()
    # samples/index, fingerprint and label, targets/logits and layers/features.3 (the run's terms), progress/digest
    assert calls.count("ListObjectsV2") == 6 and "HeadObject" not in calls, calls
    bucket.pipe(key, b"")
    r = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "run")])
    assert r.exit_code == 1 and "shards [3], object 'samples/fingerprint/c/3' empty; " in r.output, r.output
    assert not (tmp_path / "run").exists()
    bucket.pipe(key, kept)  # the store whole again: trained on
    r = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "run")])
    assert r.exit_code == 0 and (tmp_path / "run" / "student.pt").is_file(), r.output


def test_extract_on_s3_redoes_a_done_shard_whose_object_is_missing_found_by_one_list_per_array_as_export_finds_it(s3, tiny_store, capfd):
    """A done shard that lost an object in the bucket (deleted, a copy that stopped short) is redone by the next
    extract, as for a local folder: the store then equals the local one. Finding it lists each array's objects (one
    ListObjectsV2 each: 4 shards fit one page) and asks for no object one by one (no HeadObject per shard)."""
    import s3fs

    from conftest import TINY_TOML
    from kdcache.storage import filesystem

    url = f"s3://{BUCKET}/lost-object.zarr"
    kdcache.extract(kdcache.load_pipeline(TINY_TOML), url, storage_options=s3)
    s3fs.S3FileSystem(**s3, skip_instance_cache=True).rm(f"{BUCKET}/lost-object.zarr/targets/layers/features.3/c/2/0/0/0")
    store = open_store(url, storage_options=s3)
    fs = filesystem(url, s3)[0]  # the instance the listing uses (fsspec caches it)
    fs.ls(BUCKET)  # connected: its client exists
    calls: list[str] = []
    fs.s3.meta.events.register("before-call.s3", lambda model, **_: calls.append(model.name))
    assert list(store.unbacked_shards()) == [2]
    assert calls == ["ListObjectsV2"] * 6, calls  # 5 data arrays and progress/digest
    calls.clear()  # export's and pack's check of a store's objects lists them the same way (was a HeadObject per object)
    assert store.damaged_shards() == ["shard 2 of targets/layers/features.3 (rows 32-47): object "
                                      "'targets/layers/features.3/c/2/0/0/0' is missing although the shard is marked done"]
    assert calls == ["ListObjectsV2"] * 5, calls
    capfd.readouterr()
    info = kdcache.extract(kdcache.load_pipeline(TINY_TOML), url, storage_options=s3)
    assert info["complete"]
    assert "shard 2 (rows 32-47) was marked done but its object 'targets/layers/features.3/c/2/0/0/0' is missing" in capfd.readouterr().err
    assert_same_store(url, tiny_store, options_a=s3)
    assert verify(url, storage_options=s3)["ok"]


def test_an_s3_url_with_an_empty_path_segment_is_refused_before_anything_is_written(s3, tiny_store):
    """s3fs reads and writes ``/kept.zarr/...`` for ``s3://bucket//kept.zarr`` but lists, and so deletes, ``kept.zarr/...``:
    an extract to that URL (a doubled slash, typed or joined) wiped the complete store at ``s3://bucket/kept.zarr``
    without --overwrite and wrote another under ``/kept.zarr``, which no command then found at either spelling."""
    import s3fs

    from conftest import TINY_TOML

    fs = s3fs.S3FileSystem(**s3, skip_instance_cache=True)
    kdcache.extract(kdcache.load_pipeline(TINY_TOML), f"s3://{BUCKET}/kept.zarr", storage_options=s3)
    before = fs.find(f"{BUCKET}/kept.zarr")
    for url in (f"s3://{BUCKET}//kept.zarr", f"s3://{BUCKET}/runs//kept.zarr"):
        with pytest.raises(StoreError, match=rf"^'{re.escape(url)}' has an empty path segment \('//'\), .*; pass 's3://{BUCKET}/(runs/)?kept.zarr'$"):
            kdcache.extract(kdcache.load_pipeline(TINY_TOML), url, storage_options=s3)
    r = CliRunner().invoke(main, ["info", f"s3://{BUCKET}//kept.zarr", *(f"--storage-option={k}={v}" for k, v in s3.items())])
    assert r.exit_code == 1 and r.output.startswith("Error: ") and "pass 's3://" in r.output and len(r.output.splitlines()) == 1, r.output
    assert fs.find(f"{BUCKET}/kept.zarr", refresh=True) == before and len(before) == 40
    assert not [k for k in fs.find(BUCKET, refresh=True) if "//" in k or k.startswith(f"{BUCKET}/runs")]
    assert_same_store(f"s3://{BUCKET}/kept.zarr/", tiny_store, options_a=s3)  # a trailing slash is fine


def test_a_process_that_listed_an_s3_store_sees_what_another_process_writes_there_since(s3, tiny_store):
    """fsspec keeps an instance's listings (instances are shared per options) and answered later looks from them for
    the life of the process: once a store had been listed (pack's listing of its objects), a done marker another process
    wrote since was never seen (open_store of a store being extracted stayed as done as it was), and a prefix emptied
    since was still "not a zarr v3 group" to an extract there."""
    from pathlib import Path

    import s3fs

    other = s3fs.S3FileSystem(**s3, skip_instance_cache=True)  # another process's
    prefix, held = f"{BUCKET}/being-written.zarr", {}
    for f in Path(tiny_store).rglob("*"):
        key = f.relative_to(tiny_store).as_posix()
        if f.is_file():
            if key.startswith("progress/done/c/") and key != "progress/done/c/0":
                held[key] = f.read_bytes()
            else:
                other.pipe(f"{prefix}/{key}", f.read_bytes())
    url = f"s3://{prefix}"
    store = open_store(url, storage_options=s3)
    assert store.done().tolist() == [True, False, False, False]
    store.object_keys()  # pack's listing
    assert store.info()["shards_done"] == 1  # a listing of sizes
    other.pipe({f"{prefix}/{key}": body for key, body in held.items()})  # the other process marks shards 1-3 done
    assert open_store(url, storage_options=s3).done().all()  # was [True, False, False, False]
    assert open_store(url, storage_options=s3).info()["complete"]
    other.rm(prefix, recursive=True)  # the other process deletes the store: the prefix may be written again
    assert kdcache.extract(kdcache.load_pipeline(TINY_TOML), url, storage_options=s3)["complete"]  # was "not a zarr v3 group"
    assert_same_store(url, tiny_store, options_a=s3)


def test_a_listings_cache_asked_for_is_kept(s3):
    """kdcache opens its filesystems without fsspec's listings cache; one the user asks for is theirs."""
    from kdcache.storage import filesystem

    url = f"s3://{BUCKET}/any.zarr"
    assert filesystem(url, s3)[0].dircache.use_listings_cache is False
    assert filesystem(url, {**s3, "use_listings_cache": True})[0].dircache.use_listings_cache is True
    assert filesystem(url, {**s3, "listings_expiry_time": 60})[0].dircache.listings_expiry_time == 60
    assert filesystem(url, {**s3, "listings_expiry_time": 60})[0].dircache.use_listings_cache is True


def test_a_filesystem_that_gives_its_options_to_a_client_is_opened_without_a_listings_cache_option():
    """fsspec's sftp gives its options to paramiko's connect, webdav4's to an httpx client: use_listings_cache=False, added
    to any filesystem whose constructor takes **kwargs, was a TypeError there ('unexpected keyword argument
    'use_listings_cache''), so a store at such a URL, which README says any fsspec URL is, no longer opened."""
    import fsspec
    from fsspec.spec import AbstractFileSystem

    from kdcache.storage import filesystem

    def connect(port: int = 22, username: str | None = None) -> dict:  # a client that takes its own options only
        return {"port": port, "username": username}

    class ClientBacked(AbstractFileSystem):
        protocol = "kdclientbacked"

        def __init__(self, **client_kwargs):
            super().__init__(**client_kwargs)
            self.client = connect(**client_kwargs)

    fsspec.register_implementation("kdclientbacked", ClientBacked, clobber=True)
    assert filesystem("kdclientbacked://host/t.zarr", None)[0].client == {"port": 22, "username": None}
    assert filesystem("kdclientbacked://host/t.zarr", {"port": 2222})[0].client["port"] == 2222


def test_s3_refuses_to_overwrite_foreign_objects(s3):
    import s3fs

    fs = s3fs.S3FileSystem(**s3, skip_instance_cache=True)
    fs.pipe(f"{BUCKET}/foreign/data.bin", b"not a store")
    with pytest.raises(StoreError, match="exists and is not a kdcache store"):
        kdcache.extract(make_pipeline(), f"s3://{BUCKET}/foreign", storage_options=s3)
    assert fs.cat(f"{BUCKET}/foreign/data.bin") == b"not a store"
    with pytest.raises(StoreError, match="no store at"):
        open_store(f"s3://{BUCKET}/absent.zarr", storage_options=s3)


def test_s3_overwrite_of_a_store_prefix_holding_other_objects_is_refused_naming_them(s3, tiny_store):
    """zarr's mode="w" deletes an S3 store's prefix whole, as it does a folder: an --overwrite of a store under whose prefix
    other objects lie (notes, a run uploaded there, another store) deleted them with no word (the refusal looked at local
    folders only). It is refused naming them, as for a folder; moved out, the store is replaced."""
    import s3fs

    fs = s3fs.S3FileSystem(**s3, skip_instance_cache=True)
    url, tiny = f"s3://{BUCKET}/with-notes.zarr", kdcache.load_pipeline(TINY_TOML)
    fs.put(str(tiny_store), f"{BUCKET}/with-notes.zarr", recursive=True)
    fs.pipe(f"{BUCKET}/with-notes.zarr/NOTES.md", b"keep me")
    fs.put(str(tiny_store), f"{BUCKET}/with-notes.zarr/old.zarr", recursive=True)
    with pytest.raises(StoreError, match=re.escape(f"{url!r} holds 2 entries besides its store, which overwrite=True would delete with it: "
                                                   "'NOTES.md', 'old.zarr/' (a kdcache store); move them out")):
        kdcache.extract(tiny, url, storage_options=s3, overwrite=True)
    assert fs.cat(f"{BUCKET}/with-notes.zarr/NOTES.md") == b"keep me" and fs.exists(f"{BUCKET}/with-notes.zarr/old.zarr/zarr.json")
    fs.rm([f"{BUCKET}/with-notes.zarr/NOTES.md"])
    fs.rm(f"{BUCKET}/with-notes.zarr/old.zarr", recursive=True)
    for marker in ("with-notes.zarr/", "with-notes.zarr/samples/"):  # a console's empty "folder" objects: no one's data
        fs.call_s3("put_object", Bucket=BUCKET, Key=marker, Body=b"")
    fs.invalidate_cache()
    assert kdcache.extract(tiny, url, storage_options=s3, overwrite=True)["complete"]


def test_s3_overwrite_replaces_what_is_left_of_a_store_whose_deletion_was_stopped(s3, tiny_store):
    """s3fs deletes a prefix in concurrent batches of 1000 keys: an --overwrite stopped there can leave chunks without the
    root zarr.json. --overwrite replaces such remains (it was refused as "not a kdcache store"); an object of anything
    else among them is never deleted."""
    import s3fs

    fs = s3fs.S3FileSystem(**s3, skip_instance_cache=True)
    for name, extra in (("left.zarr", None), ("left-other.zarr", "samples/index/c/notes.txt")):
        fs.put(str(tiny_store), f"{BUCKET}/{name}", recursive=True)
        fs.rm([f"{BUCKET}/{name}/zarr.json", f"{BUCKET}/{name}/samples/index/c/1"])
        fs.rm(f"{BUCKET}/{name}/targets/logits", recursive=True)
        if extra:
            fs.pipe(f"{BUCKET}/{name}/{extra}", b"keep me")
    url, tiny = f"s3://{BUCKET}/left.zarr", kdcache.load_pipeline(TINY_TOML)
    with pytest.raises(StoreError, match=r"holds what is left of a kdcache store whose deletion was stopped .*overwrite=True to replace it"):
        kdcache.extract(tiny, url, storage_options=s3)
    assert kdcache.extract(tiny, url, storage_options=s3, overwrite=True)["complete"]
    assert_same_store(url, tiny_store, options_a=s3)
    with pytest.raises(StoreError, match="exists and is not a kdcache store"):
        kdcache.extract(tiny, f"s3://{BUCKET}/left-other.zarr", storage_options=s3, overwrite=True)
    assert fs.cat(f"{BUCKET}/left-other.zarr/samples/index/c/notes.txt") == b"keep me"


def test_s3_overwrite_keeps_the_object_named_as_the_stores_prefix(s3, tiny_store):
    """An object whose key is the store's prefix itself (``s3://BUCKET/named``, a user's file, beside the store
    ``s3://BUCKET/named/``) is no object of the store: an --overwrite deleted it (s3fs's recursive delete of a prefix takes
    the object of that name too). It is kept, as are the siblings sharing the prefix (``named2/``, ``named.txt``)."""
    import s3fs

    fs = s3fs.S3FileSystem(**s3, skip_instance_cache=True)
    url, tiny = f"s3://{BUCKET}/named", kdcache.load_pipeline(TINY_TOML)
    fs.put(str(tiny_store), f"{BUCKET}/named", recursive=True)
    others = {f"{BUCKET}/named": b"a user's file", f"{BUCKET}/named2/x": b"another's", f"{BUCKET}/named.txt": b"notes"}
    for key, body in others.items():
        fs.pipe(key, body)
    assert kdcache.extract(tiny, url, storage_options=s3, overwrite=True)["complete"]
    fs.invalidate_cache()
    assert {key: fs.cat(key) for key in others} == others
    assert_same_store(url, tiny_store, options_a=s3)


@pytest.mark.parametrize("name", ["wild[12]", "wild*", "wild?"])
def test_s3_store_names_holding_wildcards_are_refused_before_anything_is_deleted(name, s3, tmp_path):
    """fsspec's delete reads ``*``, ``?`` and ``[`` in a path as wildcards: an extract to ``s3://BUCKET/wild[12]`` (a new
    store, no --overwrite: zarr clears its prefix first) deleted the objects of ``wild1/`` and ``wild2/`` (``wild*``:
    of every prefix so named, ``wild.txt`` too). Writing there (extract, import) is refused in one line naming the
    character and a name without it; nothing is deleted."""
    import s3fs

    fs = s3fs.S3FileSystem(**s3, skip_instance_cache=True)
    others = {f"{BUCKET}/wild1/notes.txt": b"keep me", f"{BUCKET}/wild2/model.pt": b"and me", f"{BUCKET}/wildx": b"me too"}
    for key, body in others.items():
        fs.pipe(key, body)
    url = f"s3://{BUCKET}/{name}"
    wildcard = re.escape(repr(re.search(r"[*?[]", name).group()))
    with pytest.raises(StoreError, match=rf"^{re.escape(repr(url))} holds {wildcard}, a wildcard to fsspec's deletes: .* \(e.g. 's3://{BUCKET}/wild-"):
        kdcache.extract(kdcache.load_pipeline(TINY_TOML), url, storage_options=s3)
    with pytest.raises(StoreError, match=rf"^{re.escape(repr(url))} holds {wildcard}, a wildcard"):
        import_hdf5(str(tmp_path / "absent.h5"), url, storage_options=s3, overwrite=True)
    fs.invalidate_cache()
    assert {key: fs.cat(key) for key in others} == others and not [k for k in fs.find(BUCKET) if "wild" in k and "kdcache-lock" in k]


def test_a_mistyped_bucket_is_named_not_sent_to_extract(s3):
    """A bucket that does not exist was "no store at ...; run kdcache extract PIPELINE --out ... first": an extract there
    fails too, once its teacher is built ("The specified bucket does not exist")."""
    r = CliRunner().invoke(main, ["info", "s3://kdcache-tset/t.zarr", *(f"--storage-option={k}={v}" for k, v in s3.items())])
    assert r.exit_code == 1 and r.output.strip() == ("Error: no store at 's3://kdcache-tset/t.zarr': there is no bucket 'kdcache-tset' "
                                                     "(or these credentials cannot see it); check the bucket name, --storage-option "
                                                     "values and credentials"), r.output
    with pytest.raises(StoreError, match=r"no store at .*; run kdcache extract PIPELINE --out s3://\S+/absent.zarr first$"):
        open_store(f"s3://{BUCKET}/absent.zarr", storage_options=s3)  # the bucket is there: the store is not


def test_writing_or_copying_in_a_mistyped_bucket_names_it(s3, tmp_path):
    """extract (and import) into a bucket that does not exist said "cannot lock ...: its lock object ...: The specified
    bucket does not exist", and pack or export of a store there "cannot keep writers out ...; check that the endpoint is
    up": both now name the bucket, as info does."""
    options = [f"--storage-option={k}={v}" for k, v in s3.items()]
    url = "s3://kdcache-tset/t.zarr"
    for args, said in ((["extract", TINY_TOML, "--out", url], f"cannot write {url!r}: there is no bucket 'kdcache-tset' (or these "
                        "credentials cannot see it); create it, or check the bucket name, --storage-option values and credentials"),
                       (["pack", url, tmp_path / "t.zarr.zip"], f"no store at {url!r}: there is no bucket 'kdcache-tset' (or these "
                        "credentials cannot see it); check the bucket name, --storage-option values and credentials")):
        r = CliRunner().invoke(main, [*map(str, args), *options])
        assert r.exit_code == 1 and r.output.strip() == f"Error: {said}", r.output
    assert not (tmp_path / "t.zarr.zip").exists()


def test_http_store_is_read_only_and_reads_like_local(http_root, tiny_store, tmp_path):
    from conftest import TINY_TOML

    root, base = http_root
    import shutil

    shutil.copytree(tiny_store, root / "tiny.zarr")
    url = f"{base}/tiny.zarr"
    assert_same_store(url, tiny_store)
    assert open_store(url).info()["bytes_stored"] is None  # http cannot list sizes
    report = verify(url)
    assert report["ok"], report
    result = kdcache.train(kdcache.load_pipeline(TINY_TOML, ["train.epochs=1"]), url, tmp_path / "run")
    assert np.isfinite(result["loss"])
    with pytest.raises(StoreError, match="read-only"):
        kdcache.extract(kdcache.load_pipeline(TINY_TOML), f"{base}/new.zarr")
    with pytest.raises(StoreError, match="no store at"):
        open_store(f"{base}/absent.zarr")


@pytest.mark.parametrize("topk", [False, True], ids=["logits", "topk"])
@pytest.mark.parametrize("packed", [False, True], ids=["folder", "zip"])
def test_targets_streamed_over_http_stay_with_their_rows(http_root, numbered_store, packed, topk, tmp_path):
    """Streaming from an http store (a request per shard of each column, in parallel) or a zip over http (fsspec's chain,
    an object store's path) puts the shards back in each buffer's row order: every row's input, targets and label must
    still be its own item's, through buffers of several shards, rows in no order, joined streams, a rank's stream, a last
    short batch and an epoch resumed inside. A column put back in another order than the index would pass the
    fingerprint check (the index and fingerprint columns agree) with another row's targets. A store of top-k logits
    (topk_zoo.index_peaked's) has two target columns, its values and its classes, each naming the row's sample."""
    import shutil

    from kdcache.cache import TransferSet
    from kdcache.pipeline import from_dict
    from conftest import FIXTURES, NUMBERED
    from numbered import Numbered
    from test_cache import check_aligned

    root, base = http_root
    name, store = ("topk", str(tmp_path / "topk.zarr")) if topk else ("numbered", numbered_store)
    if topk:
        kdcache.extract(from_dict({**NUMBERED, "teacher": {"factory": "topk_zoo.py:index_peaked"},
                                   "targets": {"logits": True, "dtype": "float32", "topk": 3}}, root=FIXTURES), store)
    shutil.copytree(store, root / f"{name}.zarr", dirs_exist_ok=True)
    if packed:
        pack(store, root / f"{name}.zarr.zip", overwrite=True)
    url = f"zip::{base}/{name}.zarr.zip" if packed else f"{base}/{name}.zarr"
    rows = np.random.default_rng(4).permutation(100)[:61]  # 61 rows of all 7 shards, in no order
    for streams, stream in ((2, None), (2, 1)):
        ts = TransferSet(url, Numbered(), ["logits"], batch_size=7, seed=2, rows=rows, memory_budget_mb=0.0, buffer_shards=3,
                         streams=streams, stream=stream)
        ts.set_epoch(1)
        whole = list(ts)
        for batch in whole:
            (check_topk_aligned if topk else check_aligned)(batch)
        if stream is None:
            assert sorted(int(r) for b in whole for r in b["rows"]) == sorted(rows.tolist())
        ts.set_epoch(1, skip=3)
        assert [b["rows"].tolist() for b in ts] == [b["rows"].tolist() for b in whole[3:]]


def check_topk_aligned(batch: dict) -> None:
    """``test_cache.check_aligned`` for a store of topk_zoo.index_peaked's top 3: the values and the classes of every row
    name the row's own dataset item (i at class i, then i - 1 at classes i - 1 and i + 1)."""
    index = batch["index"]
    assert torch.equal(index, batch["rows"]) and torch.equal(batch["inputs"][:, 0, 0, 0], index.float())
    assert torch.equal(batch["label"], index % 4)
    values, classes = batch["targets"]["targets/logits"], batch["targets"]["targets/logits_indices"]
    assert values.tolist() == [[i, i - 1, i - 1 - (i == 0)] for i in index.tolist()]
    assert classes.tolist() == [[i, *([1, 2] if i == 0 else [i - 1, i + 1])] for i in index.tolist()]


def test_a_served_folder_is_the_one_its_server_was_started_over(tmp_path, monkeypatch):
    """``served_folder`` took a port found free, which the server bound later: under pytest-xdist another worker's server or
    connection could take it meanwhile, and the fixture yielded that worker's server. Here such a port is held."""
    import http.server
    import threading

    impostor = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)  # serves the cwd
    threading.Thread(target=impostor.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    monkeypatch.setattr(sys.modules[__name__], "free_port", lambda: impostor.server_address[1])
    (tmp_path / "mine").write_text("mine")
    served = served_folder(tmp_path, "http.server")
    _, base = next(served)
    try:
        assert urllib.request.urlopen(f"{base}/mine", timeout=10).read() == b"mine"
    finally:
        next(served, None)
        impostor.shutdown()
        impostor.server_close()


def test_http_server_honours_byte_ranges(http_root):
    """Sharded arrays are read by byte range: the server the HTTP tests rely on must answer 206."""
    root, base = http_root
    (root / "bytes.bin").write_bytes(bytes(range(100)))
    request = urllib.request.Request(f"{base}/bytes.bin", headers={"Range": "bytes=10-19"})
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.status == 206 and response.read() == bytes(range(10, 20))


def test_zip_from_s3_pack_reads_everywhere(s3, http_root, tmp_path):
    from conftest import TINY_TOML

    url = f"s3://{BUCKET}/topack.zarr"
    kdcache.extract(kdcache.load_pipeline(TINY_TOML), url, storage_options=s3)
    root, base = http_root
    out = root / "handover.zarr.zip"
    r = pack(url, out, storage_options=s3)
    assert r["objects"] == 40  # 12 zarr.json, 4 shards of 5 arrays, 4 done markers, 4 digest rows
    assert_same_store(str(out), url, options_b=s3)
    assert verify(str(out))["ok"]
    # a zip served over http reads as a store through fsspec's zip-over-http chain
    assert_same_store(f"zip::{base}/handover.zarr.zip", str(out))
    result = kdcache.train(kdcache.load_pipeline(TINY_TOML, ["train.epochs=1"]), str(out), tmp_path / "run")
    assert np.isfinite(result["loss"])
    with pytest.raises(StoreError, match="write-once"):
        kdcache.extract(kdcache.load_pipeline(TINY_TOML), str(out))


def test_storage_options_on_a_local_path_are_refused(tiny_store):
    with pytest.raises(StoreError, match="apply to URL locations"):
        open_store(tiny_store, storage_options={"anon": True})
    r = CliRunner().invoke(main, ["info", tiny_store, "--storage-option", "anon=true"])
    assert r.exit_code == 1 and "apply to URL locations" in r.output
    r = CliRunner().invoke(main, ["info", tiny_store, "--storage-option", "novalue"])
    assert r.exit_code == 2 and "KEY=VALUE" in r.output


def test_storage_option_values_are_json_and_nest():
    from kdcache.cli import _storage_options

    assert _storage_options(("anon=true", "client_kwargs.region_name=eu-west-1", "block_size=5", "endpoint_url=http://h:1")) == {
        "anon": True, "client_kwargs": {"region_name": "eu-west-1"}, "block_size": 5, "endpoint_url": "http://h:1"}
    assert _storage_options(()) is None


def test_a_missing_fsspec_backend_names_the_package_that_installs_it():
    """kdcache[remote] installs s3fs and aiohttp: a gs:// location needs gcsfs, which the error must name instead."""
    import importlib.util

    if importlib.util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed here")
    with pytest.raises(StoreError, match=r"needs an fsspec backend that is not installed .*gcsfs.*; pip install gcsfs$"):
        open_store("gs://bucket/t.zarr")
    r = CliRunner().invoke(main, ["info", "gs://bucket/t.zarr"])
    assert r.exit_code == 1 and "pip install gcsfs" in r.output and "kdcache[remote]" not in r.output


def test_a_backend_missing_one_of_its_own_dependencies_is_named_as_such(tmp_path, monkeypatch):
    """An installed backend that cannot import its dependency (gcsfs without google.auth): reinstall the backend,
    not `pip install google`. The backend is a real module registered with fsspec under a protocol of its own."""
    from fsspec.registry import known_implementations

    (tmp_path / "kdcache_probe_fs.py").write_text("import kdcache_probe_missing.auth\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(known_implementations, "kdprobe",
                        {"class": "kdcache_probe_fs.ProbeFileSystem", "err": "Install kdcache_probe_fs to access kdprobe://"})
    with pytest.raises(StoreError) as raised:
        open_store("kdprobe://bucket/t.zarr")
    assert str(raised.value) == ("'kdprobe://bucket/t.zarr' needs the fsspec backend kdcache_probe_fs, which is installed but cannot "
                                 "import 'kdcache_probe_missing'; reinstall it with its dependencies: pip install "
                                 "--force-reinstall kdcache_probe_fs")


def test_http_no_store_messages_name_the_cause(http_root):
    """fsspec's exists() answers False for a refused connection, a TLS handshake with a plain server and a 404
    alike; the message says which, and never suggests extracting to a read-only http location."""
    import zarr

    root, base = http_root
    refused = f"http://127.0.0.1:{free_port()}/tiny.zarr"
    with pytest.raises(StoreError) as e:
        open_store(refused)
    assert str(e.value).startswith(f"cannot reach {refused!r} (ClientConnectorError: Cannot connect to host")
    assert "check the URL and that the server is up" in str(e.value) and "kdcache extract" not in str(e.value)
    tls = base.replace("http://", "https://") + "/tiny.zarr"  # TLS to a plain-http server
    with pytest.raises(StoreError, match=r"cannot reach .* \(ClientConnector\w*Error: .*SSL"):
        open_store(tls)
    with pytest.raises(StoreError) as e:
        open_store(f"{base}/absent.zarr")
    assert str(e.value) == f"no store at '{base}/absent.zarr' ({base}/absent.zarr/zarr.json: HTTP 404); check the URL"
    zarr.open_group(str(root / "v2.zarr"), mode="w", zarr_format=2).create_array("x", shape=(2,), dtype="int8")
    with pytest.raises(StoreError, match="is a zarr v2 group"):
        open_store(f"{base}/v2.zarr")
    with pytest.raises(StoreError, match=r"no store at 'zip::.*absent.zarr.zip' \(.*absent.zarr.zip: HTTP 404\); check the URL"):
        open_store(f"zip::{base}/absent.zarr.zip")
    with pytest.raises(StoreError, match=r"cannot reach 'zip::http://127.0.0.1:\d+/t.zarr.zip' \(ClientConnectorError"):
        open_store(f"zip::http://127.0.0.1:{free_port()}/t.zarr.zip")
    r = CliRunner().invoke(main, ["info", refused])
    assert r.exit_code == 1 and r.output.startswith("Error: cannot reach") and "Traceback" not in r.output


def test_folder_over_plain_http_reads_but_zip_needs_range(plain_http_root, tiny_store, tmp_path):
    """A store folder reads over ``python -m http.server`` (whole objects, no Range); ``zip::http`` needs Range,
    and the error says so in full (it was cut at 80 characters, before the cause)."""
    import shutil

    root, base = plain_http_root
    shutil.copytree(tiny_store, root / "tiny.zarr")
    assert verify(f"{base}/tiny.zarr")["ok"]
    pack(tiny_store, root / "t.zarr.zip")
    r = CliRunner().invoke(main, ["info", f"zip::{base}/t.zarr.zip"])
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1, r.output
    assert r.output.startswith(f"Error: cannot reach 'zip::{base}/t.zarr.zip': The HTTP server doesn't appear to support range requests")
    assert "with storage options" not in r.output and "HTTP Range requests, or download it" in r.output


def test_pack_over_http_skips_writer_temp_files(http_root, tiny_store, tmp_path):
    """Temp files a killed writer left (FORMAT.md §13.1) are not objects, whatever the location: pack over http
    writes the same zip as pack of the local folder."""
    import shutil

    root, base = http_root
    local = tmp_path / "t.zarr"
    shutil.copytree(tiny_store, local)
    (local / "targets/logits/c/1/.0.4242.tmp").write_bytes(b"half a shard")
    (local / "targets/logits/zarr.json.0123456789abcdef0123456789abcdef.partial").write_bytes(b"{")
    (local / "zarr.0123456789abcdef0123456789abcdef.partial").write_bytes(b"{")
    shutil.copytree(local, root / "temps.zarr")
    pack(str(local), tmp_path / "local.zarr.zip")
    pack(f"{base}/temps.zarr", tmp_path / "http.zarr.zip")
    assert (tmp_path / "http.zarr.zip").read_bytes() == (tmp_path / "local.zarr.zip").read_bytes()
    keys = open_store(f"{base}/temps.zarr").object_keys()
    assert len(keys) == 40 and not [k for k in keys if k.endswith((".tmp", ".partial"))]


def test_pack_of_a_url_with_a_trailing_slash_is_the_same_zip(http_root, s3, tiny_store, tmp_path):
    """zarr lists a store by its path plus "/": for http://host/t.zarr/ it listed every object under its full URL, so
    pack wrote a zip of members named http://..., then refused it as "no store in 'OUT.part.zip'"."""
    import shutil

    import s3fs

    root, base = http_root
    shutil.copytree(tiny_store, root / "slash.zarr", dirs_exist_ok=True)
    s3fs.S3FileSystem(**s3, skip_instance_cache=True).put(tiny_store, f"{BUCKET}/slash.zarr", recursive=True)
    pack(tiny_store, tmp_path / "local.zarr.zip")
    for i, (url, options) in enumerate(((f"{base}/slash.zarr/", None), (f"{base}/slash.zarr//", None), (f"s3://{BUCKET}/slash.zarr/", s3))):
        assert open_store(url, storage_options=options).object_keys() == open_store(tiny_store).object_keys(), url
        pack(url, tmp_path / f"{i}.zarr.zip", storage_options=options)
        assert (tmp_path / f"{i}.zarr.zip").read_bytes() == (tmp_path / "local.zarr.zip").read_bytes(), url


def test_a_server_gone_mid_run_is_not_called_damage(tiny_store, tmp_path):
    """A read that fails on the way (the server went away, a refused connection) says the location could not be
    read and that nothing says the store is damaged: never "re-extract", never a traceback."""
    import shutil

    from moto.server import ThreadedMotoServer
    from s3fs import S3FileSystem

    from kdcache.store import LOGITS

    www = tmp_path / "www"
    shutil.copytree(tiny_store, www / "tiny.zarr")
    served = served_folder(www, "RangeHTTPServer")
    _, base = next(served)
    http = open_store(f"{base}/tiny.zarr")
    http.read(LOGITS, 0, 16)
    next(served, None)  # the server stops

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    options = {"endpoint_url": f"http://{host}:{port}", "key": "testing", "secret": "testing",
               "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2}}
    fs = S3FileSystem(**options, skip_instance_cache=True)
    fs.mkdir("kdcache-outage")  # moto's buckets are per process, shared with the s3 fixture's server: its own
    fs.put(str(tiny_store), "kdcache-outage/tiny.zarr", recursive=True)
    s3 = open_store("s3://kdcache-outage/tiny.zarr", storage_options=options)
    s3.read(LOGITS, 0, 16)
    server.stop()

    for store in (http, s3):
        with pytest.raises(StoreError) as e:
            store.read(LOGITS, 16, 32)
        message = str(e.value)
        assert message.startswith(f"cannot read rows 16-31 of {LOGITS} from {store.location!r}: "), message
        assert "nothing says the store is damaged" in message and "re-extract" not in message, message


class KeepAliveS3:
    """An S3 endpoint on 127.0.0.1 in front of the moto server at ``upstream`` that keeps its connections alive, as a
    real one does (moto closes each: ``Connection: close``), and answers ``faults[KEY_PART]`` (403, 500...) to the GETs
    and HEADs whose path holds KEY_PART (``requests``: each request's method and path); ``put_faults[KEY_PART]`` to PUTs (403 AccessDenied, 501 NotImplemented, else InternalError) and
    ``unanswered`` PUTs it never answers; ``unconditional`` PUTs it forwards without their ``If-None-Match`` (a server that
    ignores the condition: some S3-compatible ones); ``cut[KEY_PART]`` GETs whose body it cuts short (half of it sent, the connection
    closed: a connection dropped mid-read); ``endless`` GETs it answers with zeros and no ``Content-Length`` until the
    client hangs up (a broken or hostile server's endless body). ``gate``: a ``Gate`` every request passes before it is
    forwarded (a bucket across the world that answers none of a client's requests before it has sent them all). A
    request body sent chunked is not forwarded (botocore's PUTs give their length)."""

    def __init__(self, upstream: str):
        import http.server
        import threading
        import urllib.error

        self.faults: dict[str, int] = {}
        self.put_faults: dict[str, int] = {}
        self.unanswered: set[str] = set()
        self.unconditional: set[str] = set()
        self.cut: dict[str, int] = {}
        self.endless: set[str] = set()
        self.requests: list[tuple[str, str]] = []  # (method, path) of each request, as it came
        self.gate: Gate | None = None
        self.closed = threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def forward(self) -> None:
                outer.requests.append((self.command, self.path))
                if outer.gate is not None:
                    outer.gate.wait(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                fault = next((code for part, code in outer.faults.items() if part in self.path and self.command in ("GET", "HEAD")), None)
                put_fault = next((code for part, code in outer.put_faults.items() if part in self.path and self.command == "PUT"), None)
                if self.command == "PUT" and any(part in self.path for part in outer.unanswered):
                    outer.closed.wait()
                    return
                if self.command == "GET" and any(part in self.path for part in outer.endless):
                    return self.send_endless()
                if fault is not None:
                    status, headers, data = fault, {"Content-Type": "application/xml"}, b"<Error><Code>AccessDenied</Code></Error>"
                elif put_fault is not None:
                    code = {403: b"AccessDenied", 501: b"NotImplemented"}.get(put_fault, b"InternalError")
                    status, headers, data = put_fault, {"Content-Type": "application/xml"}, b"<Error><Code>" + code + b"</Code></Error>"
                else:
                    # a body's Content-Type as sent: urllib's default (a form) has moto's server read it as one, storing nothing
                    dropped = {"host", *(["if-none-match"] if any(part in self.path for part in outer.unconditional) else [])}
                    request = urllib.request.Request(upstream + self.path, data=body, method=self.command,
                                                     headers={"Content-Type": "application/octet-stream",
                                                              **{k: v for k, v in self.headers.items() if k.lower() not in dropped}})
                    try:
                        response = urllib.request.urlopen(request, timeout=30)
                    except urllib.error.HTTPError as e:
                        response = e
                    status, data = response.status, response.read()
                    headers = {k: v for k, v in response.headers.items() if k.lower() not in ("content-length", "connection", "transfer-encoding")}
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                cut = next((part for part, left in outer.cut.items() if part in self.path and left and self.command == "GET"), None)
                if cut is not None:
                    outer.cut[cut] -= 1
                    self.wfile.write(data[: len(data) // 2])
                    self.close_connection = True
                elif self.command != "HEAD":
                    self.wfile.write(data)

            def send_endless(self) -> None:
                self.send_response(200)
                self.send_header("Connection", "close")
                self.end_headers()
                self.close_connection = True
                with contextlib.suppress(OSError):  # the client hung up
                    while not outer.closed.is_set():
                        self.wfile.write(bytes(2**20))

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        # shutdown() waits for serve_forever to look again: every 0.5 s by default, paid by each test at its end
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self) -> None:
        self.closed.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def keep_alive_s3(s3):
    endpoint = KeepAliveS3(s3["endpoint_url"])
    yield endpoint
    endpoint.close()


def test_a_command_on_an_s3_endpoint_that_keeps_connections_alive_ends_without_a_traceback(s3, keep_alive_s3, tiny_store):
    """The first look's filesystem (its short timeouts) was dropped once used; s3fs closes a filesystem's client when it
    is collected, on the event loop running in the collecting thread: zarr's, not the client's. With a connection kept
    alive (any real S3 endpoint) every command printed "Task exception was never retrieved ... attached to a different
    loop" and a 20-line traceback as it ended, `info` and `verify` of a sound store included."""
    import s3fs

    s3fs.S3FileSystem(**s3, skip_instance_cache=True).put(tiny_store, f"{BUCKET}/alive.zarr", recursive=True)
    options = [f"--storage-option={k}={v}" for k, v in {**s3, "endpoint_url": keep_alive_s3.url}.items()]
    for command in ("info", "verify"):
        proc = subprocess.run([sys.executable, "-m", "kdcache.cli", command, f"s3://{BUCKET}/alive.zarr", *options],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and proc.stderr == "", proc.stderr


@pytest.mark.parametrize("status, said", [(403, "AccessDenied"), (500, "InternalError")])
def test_an_extract_whose_shard_put_an_s3_endpoint_refuses_fails_in_one_line_and_resumes(status, said, s3, keep_alive_s3, tmp_path):
    """A whole shard's columns are PUT at once (``Store._put_at_once``): one column's PUT refused (403) or failed (5xx)
    ends the extract in the one line zarr's column-by-column writes gave, that shard not marked done; rerun, it resumes."""
    from reference import _dotted

    url = f"s3://{BUCKET}/refused{status}.zarr"
    options = {**s3, "endpoint_url": keep_alive_s3.url, "config_kwargs": {"retries": {"max_attempts": 0}}}
    keep_alive_s3.put_faults[f"refused{status}.zarr/targets/logits/c/1/"] = status
    command = ["extract", str(TINY_TOML), "--out", url, *(f"--storage-option={k}={v}" for k, v in _dotted(options))]
    r = CliRunner().invoke(main, command)
    assert r.exit_code == 1 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(f"Error: cannot write shard 1 of {url!r}: ") and said in r.stderr, r.stderr
    assert "rerun the same command to resume" in r.stderr, r.stderr
    assert not open_store(url, storage_options=s3).done()[1]
    keep_alive_s3.put_faults.clear()
    r = CliRunner().invoke(main, command)
    assert r.exit_code == 0, r.stderr
    assert open_store(url, storage_options=s3).done().all() and verify(url, storage_options=s3)["ok"]


def test_pack_names_an_object_an_s3_endpoint_refuses(s3, keep_alive_s3, tiny_store, tmp_path):
    """A 403 or 5xx answered for one object pack reads (its sizes are listed first: missing or empty ones are
    refused) was s3fs's PermissionError or OSError, a traceback: it is one line naming the object."""
    import s3fs

    from reference import _dotted

    s3fs.S3FileSystem(**s3, skip_instance_cache=True).put(tiny_store, f"{BUCKET}/refused.zarr", recursive=True)
    options = {**s3, "endpoint_url": keep_alive_s3.url, "config_kwargs": {"retries": {"max_attempts": 0}}}
    keep_alive_s3.faults["refused.zarr/targets/logits/c/1/0"] = 403
    r = CliRunner().invoke(main, ["pack", f"s3://{BUCKET}/refused.zarr", str(tmp_path / "r.zarr.zip"),
                                  *(f"--storage-option={k}={v}" for k, v in _dotted(options))])
    assert r.exit_code == 1 and r.output.startswith(f"Error: cannot read object 'targets/logits/c/1/0' from 's3://{BUCKET}/refused.zarr': "
                                                    "PermissionError: "), r.output
    assert r.output.endswith("; nothing says the store is damaged: check the connection, endpoint, credentials and that the server is "
                             "up, then rerun\n") and r.output.count("\n") == 1, r.output
    assert list(tmp_path.iterdir()) == []


def test_a_digest_object_an_s3_endpoint_fails_is_one_line_not_damage(s3, keep_alive_s3, tiny_store):
    """A done shard's digest row (``progress/digest/c/S/0``) whose GET the endpoint fails: the straight reads give up and
    zarr's read raises s3fs's OSError, which was taken for a digest object that does not decode: verify's layout check
    said the store "is damaged: progress/digest does not decode", and re-extract it. It is the one line of a read that
    failed on the way, as for any other object."""
    import s3fs

    from reference import _dotted

    s3fs.S3FileSystem(**s3, skip_instance_cache=True).put(tiny_store, f"{BUCKET}/digest500.zarr", recursive=True)
    url, options = f"s3://{BUCKET}/digest500.zarr", {**s3, "endpoint_url": keep_alive_s3.url, "config_kwargs": {"retries": {"max_attempts": 0}}}
    keep_alive_s3.faults["digest500.zarr/progress/digest/c/1/0"] = 500
    r = subprocess.run([sys.executable, "-m", "kdcache.cli", "verify", url, *(f"--storage-option={k}={v}" for k, v in _dotted(options))],
                       capture_output=True, text=True, timeout=120)  # a process of its own: the endpoint's threads' noise is not its output
    assert r.returncode == 1 and r.stderr.startswith(f"Error: cannot read rows 0-3 of progress/digest from {url!r}: "), r.stdout + r.stderr
    assert r.stderr.endswith("; nothing says the store is damaged: check the connection, endpoint, credentials and that the server is "
                             "up, then rerun\n") and r.stderr.count("\n") == 1 and "damaged:" not in r.stdout, r.stdout + r.stderr
    keep_alive_s3.faults.clear()
    assert verify(url, storage_options=options)["ok"]


def test_an_s3_read_whose_body_is_cut_short_is_asked_again_as_s3fs_asks_it(s3, keep_alive_s3, tiny_store):
    """A connection dropped part way through an object's body (aiohttp's ClientPayloadError) is one s3fs retries (its
    cat_file reads again, up to its retries): the bounded read asked only the request again, and a shard or manifest
    whose body was cut once failed the command."""
    import s3fs

    s3fs.S3FileSystem(**s3, skip_instance_cache=True).put(tiny_store, f"{BUCKET}/cut.zarr", recursive=True)
    keep_alive_s3.cut.update({"cut.zarr/zarr.json": 1, "cut.zarr/targets/logits/c/1/0": 2})
    store = open_store(f"s3://{BUCKET}/cut.zarr", storage_options={**s3, "endpoint_url": keep_alive_s3.url})
    lo, hi = store.shard_rows(1)
    np.testing.assert_array_equal(store.read("targets/logits", lo, hi), open_store(tiny_store).read("targets/logits", lo, hi))
    assert keep_alive_s3.cut == {"cut.zarr/zarr.json": 0, "cut.zarr/targets/logits/c/1/0": 0}


@pytest.mark.parametrize("status, said", [(403, "AccessDenied"), (500, "InternalError"), (501, None)])
def test_an_extract_whose_s3_lock_object_cannot_be_made_stops_unless_the_server_cannot_lock(status, said, s3, keep_alive_s3, tmp_path):
    """The writer lock object's PUT refused (403) or failed (5xx): the extract stops in one line naming the lock object and
    the cause, before anything is written. A server without conditional PUTs (501 NotImplemented, some S3-compatible
    ones) cannot lock: the store is written unlocked (FORMAT.md §13), no lock object left behind."""
    import s3fs

    from reference import _dotted

    url = f"s3://{BUCKET}/lock{status}.zarr"
    options = {**s3, "endpoint_url": keep_alive_s3.url, "config_kwargs": {"retries": {"max_attempts": 0}}}
    keep_alive_s3.put_faults[f".lock{status}.zarr.kdcache-lock"] = status
    r = CliRunner().invoke(main, ["extract", str(TINY_TOML), "--out", url, *(f"--storage-option={k}={v}" for k, v in _dotted(options))])
    fs = s3fs.S3FileSystem(**s3, skip_instance_cache=True)
    if said is None:
        assert r.exit_code == 0 and r.stderr == (
            f"note: {url!r} is written without a writer lock (its S3 server cannot hold a lock: it answers a conditional PUT "
            "(If-None-Match) with 501 Not Implemented): another writer of it that starts meanwhile is not refused; run one at a "
            "time\n"), r.output
        assert open_store(url, storage_options=s3).complete and not fs.exists(f"{BUCKET}/.lock{status}.zarr.kdcache-lock")
        return
    assert r.exit_code == 1 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(f"Error: cannot lock {url!r} for writing: its lock object 's3://{BUCKET}/.lock{status}.zarr.kdcache-lock': "), r.stderr
    assert said in r.stderr and r.stderr.endswith("check the URL, --storage-option values and credentials (writing there must be "
                                                  "allowed), and rerun\n"), r.stderr
    assert not fs.exists(f"{BUCKET}/lock{status}.zarr"), "nothing written"


def test_an_s3_server_that_ignores_if_none_match_on_the_lock_put_writes_the_store_unlocked(s3, keep_alive_s3, tmp_path):
    """A server that ignores ``If-None-Match: *`` (some S3-compatible ones) accepts the second conditional PUT of the lock
    object kdcache makes once it has taken it: it cannot lock, so the store is written without a lock (FORMAT.md §13),
    the lock object deleted, not left to refuse the next writer until stale; a resume of it takes no lock either, nor
    does a pack of it. Each says so on stderr (was: nothing said that a second writer would not be refused)."""
    import s3fs

    from reference import _dotted

    url = f"s3://{BUCKET}/unconditional.zarr"
    options = {**s3, "endpoint_url": keep_alive_s3.url}
    keep_alive_s3.unconditional.add(".unconditional.zarr.kdcache-lock")
    command = ["extract", str(TINY_TOML), "--out", url, *(f"--storage-option={k}={v}" for k, v in _dotted(options))]
    r = CliRunner().invoke(main, command)
    fs = s3fs.S3FileSystem(**s3, skip_instance_cache=True)
    why = "its S3 server cannot hold a lock: it ignores If-None-Match: a second conditional PUT of the lock object was accepted"
    note = f"note: {url!r} is written without a writer lock ({why}): another writer of it that starts meanwhile is not refused; run one at a time\n"
    assert r.exit_code == 0 and r.stderr == note, r.output
    assert open_store(url, storage_options=s3).complete and not fs.exists(f"{BUCKET}/.unconditional.zarr.kdcache-lock")
    r = CliRunner().invoke(main, command)
    assert r.exit_code == 0 and r.stderr.startswith(note) and "is already complete" in r.stderr, r.output
    assert not fs.exists(f"{BUCKET}/.unconditional.zarr.kdcache-lock")
    packed = tmp_path / "unconditional.zarr.zip"
    r = CliRunner().invoke(main, ["pack", url, str(packed), *(f"--storage-option={k}={v}" for k, v in _dotted(options))])
    assert r.exit_code == 0 and r.stderr.startswith(f"note: {url!r} is read by pack without keeping writers out ({why}): "), r.output
    assert not fs.exists(f"{BUCKET}/.unconditional.zarr.kdcache-lock") and open_store(str(packed)).complete


def test_a_store_at_a_buckets_root_keeps_its_bucket_and_is_written_unlocked_saying_so(s3, tmp_path):
    """A store at a bucket's root (``s3://BUCKET``): its creation and an ``--overwrite`` clear the objects there, never the
    bucket (was: zarr's clearing deleted the bucket, s3fs's recursive delete of a bucket's root, and the extract failed
    with "The specified bucket does not exist"; in a versioned bucket every version of every object went first). It has
    no place beside it for its lock object: written, resumed and packed without the lock (FORMAT.md §13), each says so on
    stderr, with where a store is locked (was: nothing said that a second writer would not be refused)."""
    import s3fs

    from reference import _dotted

    fs = s3fs.S3FileSystem(**s3, skip_instance_cache=True)
    fs.mkdir("root-store")
    fs.make_bucket_versioned("root-store")
    fs.pipe("root-store/notes.txt", b"a user's file, deleted: its version is kept")
    fs.rm("root-store/notes.txt")
    url = "s3://root-store"
    command = ["extract", str(TINY_TOML), "--out", url, *(f"--storage-option={k}={v}" for k, v in _dotted(s3))]
    why = "a store at a bucket's root has no place beside it for its lock object, as one under a prefix has (s3://BUCKET/NAME.zarr)"
    note = f"note: {url!r} is written without a writer lock ({why}): another writer of it that starts meanwhile is not refused; run one at a time\n"
    r = CliRunner().invoke(main, command)
    assert r.exit_code == 0 and r.stderr == note, r.output
    assert open_store(url, storage_options=s3).complete and not [k for k in fs.find("root-store") if "kdcache-lock" in k]
    r = CliRunner().invoke(main, command)
    assert r.exit_code == 0 and r.stderr.startswith(note) and "is already complete" in r.stderr, r.output
    r = CliRunner().invoke(main, [*command, "--overwrite"])
    assert r.exit_code == 0 and r.stderr == note, r.output
    assert open_store(url, storage_options=s3).complete
    versions = fs.call_s3("list_object_versions", Bucket="root-store")["Versions"]
    assert "notes.txt" in {v["Key"] for v in versions}, "the deleted file's version is kept"
    packed = tmp_path / "root.zarr.zip"
    r = CliRunner().invoke(main, ["pack", url, str(packed), *(f"--storage-option={k}={v}" for k, v in _dotted(s3))])
    assert r.exit_code == 0 and r.stderr.startswith(f"note: {url!r} is read by pack without keeping writers out ({why}): "), r.output
    assert open_store(str(packed)).complete


def test_a_lock_object_that_is_not_kdcaches_refuses_a_writer_until_stale(s3, tmp_path):
    """A lock object beside the store whose body is not a kdcache lock's (not JSON: another tool's, a hand-made one) is
    a holder all the same, named as another process, until stale (``locking.LOCK_STALE_S``)."""
    import s3fs

    url = f"s3://{BUCKET}/foreign-lock.zarr"
    s3fs.S3FileSystem(**s3, skip_instance_cache=True).pipe(f"{BUCKET}/.foreign-lock.zarr.kdcache-lock", b"locked by hand")
    r = CliRunner().invoke(main, ["extract", str(TINY_TOML), "--out", url, *(f"--storage-option={k}={v}" for k, v in s3.items())])
    assert r.exit_code == 1 and r.stderr.count("\n") == 1, r.stderr
    assert re.fullmatch(rf"Error: {re.escape(repr(url))} is being written by another kdcache process, last heartbeat \d+ s ago \(taken "
                        r"over after 180 s without one\); wait for it to end or stop it, then rerun \(nothing was changed\)\n", r.stderr), r.stderr


@pytest.mark.parametrize("fault, seen", [
    ("403", None),  # not allowed to write the lock: copied without it, as a note says
    ("500", "InternalError"),  # was: copied without the lock, only a note saying so
    ("unanswered", "no answer within 20 s"),
])
def test_pack_of_an_s3_store_whose_lock_cannot_be_made_stops_unless_writing_it_is_refused(fault, seen, s3, keep_alive_s3, tiny_store,
                                                                                        tmp_path, monkeypatch):
    """Any failure of the lock object's PUT (a timeout, a 5xx, a refused connection) was taken as "this user may not write
    the lock": the store was copied without keeping writers out, with a note. Only a refusal (403 AccessDenied: s3fs's
    PermissionError) means that; any other failure stops the pack in one line naming the lock object and the cause."""
    import s3fs

    from kdcache import locking
    from reference import _dotted

    # the unanswered PUT's wait (1 s, then 3 s, then 8 s, also timed out the lock's first look: a GET the in-process server,
    # sharing this process with the command, was slow to answer in CI beside other work); the answered faults keep the shipped bound
    if fault == "unanswered":
        monkeypatch.setattr(locking, "LOCK_REQUEST_S", 20.0)
    s3fs.S3FileSystem(**s3, skip_instance_cache=True).put(tiny_store, f"{BUCKET}/lockless.zarr", recursive=True)
    options = {**s3, "endpoint_url": keep_alive_s3.url, "config_kwargs": {"retries": {"max_attempts": 0}}}
    if fault == "unanswered":
        keep_alive_s3.unanswered.add(".lockless.zarr.kdcache-lock")
    else:
        keep_alive_s3.put_faults[".lockless.zarr.kdcache-lock"] = int(fault)
    out = tmp_path / "l.zarr.zip"
    r = CliRunner().invoke(main, ["pack", f"s3://{BUCKET}/lockless.zarr", str(out), *(f"--storage-option={k}={v}" for k, v in _dotted(options))])
    if seen is None:
        assert r.exit_code == 0 and out.exists(), r.output
        assert f"note: 's3://{BUCKET}/lockless.zarr' is read by pack without keeping writers out (its lock object " in r.stderr, r.stderr
        return
    assert r.exit_code == 1 and r.stderr.startswith(
        f"Error: cannot keep writers out of 's3://{BUCKET}/lockless.zarr' while kdcache pack copies it: its lock object "
        f"'s3://{BUCKET}/.lockless.zarr.kdcache-lock': "), r.stderr
    assert seen in r.stderr and r.stderr.count("\n") == 1 and "note:" not in r.stderr, r.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("key, fault, command", [
    ("tiny.zarr/zarr.json", "500", "info"),  # was: "no store at ...; check the URL"
    ("samples/zarr.json", "500", "info"),  # was: aiohttp's traceback, as every case below
    ("targets/logits/zarr.json", "503", "verify"),
    ("progress/done/c/1", "truncate", "info"),
    ("progress/digest/zarr.json", "500", "info"),
    ("targets/logits/c/1/0", "500", "verify"),
    ("targets/layers/features.3/c/2/", "truncate", "verify"),
])
def test_a_server_failing_one_object_is_one_line_not_damage(faulty_http_root, tiny_store, key, fault, command):
    """An HTTP server that answers 5xx, or cuts a response short, for one object (metadata, a done marker, a shard) is
    a one-line error saying the location could not be read: never a traceback, never "damaged", never "no store"."""
    import shutil

    root, base = faulty_http_root
    if not (root / "tiny.zarr").exists():
        shutil.copytree(tiny_store, root / "tiny.zarr")
    (root / ".faults").write_text(json.dumps({key: fault}))
    try:
        r = CliRunner().invoke(main, [command, f"{base}/tiny.zarr"])
    finally:
        (root / ".faults").unlink()
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1, r.output
    assert r.output.startswith("Error: cannot re") and "re-extract" not in r.output and "no store" not in r.output, r.output
    assert ("HTTP 500" if key == "tiny.zarr/zarr.json" else "nothing says the store is damaged") in r.output, r.output
    assert CliRunner().invoke(main, [command, f"{base}/tiny.zarr"]).exit_code == 0  # the server answers again: all is well


def test_verify_json_of_a_server_failing_mid_verify_keeps_the_checks_done(faulty_http_root, tiny_store):
    """A server that fails a shard's read once verify's completeness and layout checks are done: --json said checks []
    (nothing checked) and lost them. Its one object holds them, ok false and the error; the Error line is on stderr."""
    import shutil

    root, base = faulty_http_root
    if not (root / "tiny.zarr").exists():
        shutil.copytree(tiny_store, root / "tiny.zarr")
    (root / ".faults").write_text(json.dumps({"targets/logits/c/1/0": "500"}))
    try:
        r = CliRunner().invoke(main, ["verify", f"{base}/tiny.zarr", "--json"])
    finally:
        (root / ".faults").unlink()
    assert r.exit_code == 1 and r.stderr.startswith("Error: cannot read ") and r.stderr.count("\n") == 1, r.output
    report = json.loads(r.stdout)
    assert report["ok"] is False and report["error"] == r.stderr.removeprefix("Error: ").rstrip("\n"), report
    assert [(c["name"], c["ok"]) for c in report["checks"]] == [("completeness", True), ("layout", True)], report


def test_pack_over_http_without_index_pages_is_the_same_zip(faulty_http_root, tiny_store, tmp_path):
    """A server that lists no folder (no index pages) still serves every object: pack takes the keys of the store's
    layout, not only the listing's (it wrote a zip without them and said "no store in 'OUT.part.zip'")."""
    import shutil

    root, base = faulty_http_root
    if not (root / "tiny.zarr").exists():
        shutil.copytree(tiny_store, root / "tiny.zarr")
    (root / ".faults").write_text(json.dumps({"/": "404"}))
    try:
        assert open_store(f"{base}/tiny.zarr").object_keys() == []  # nothing listed
        pack(f"{base}/tiny.zarr", tmp_path / "http.zarr.zip")
    finally:
        (root / ".faults").unlink()
    pack(tiny_store, tmp_path / "local.zarr.zip")
    assert (tmp_path / "http.zarr.zip").read_bytes() == (tmp_path / "local.zarr.zip").read_bytes()


def test_pack_over_http_lists_folders_a_server_pages_only_without_the_slash(faulty_http_root, tiny_store, tmp_path):
    """kdcache walks an http store's index pages itself, asking for a folder's at ``folder/``: a server that serves it at
    ``folder`` alone (a 404 with the '/') listed nothing, where fsspec's walk, which asks without the '/' (and again
    without it for a page that lists nothing), listed it all; pack then left out an array someone added (FORMAT.md
    §14) without a word. Such a folder is asked for again without the '/', as fsspec does."""
    import shutil
    import zipfile

    import zarr

    root, base = faulty_http_root
    shutil.copytree(tiny_store, root / "unslashed.zarr")
    zarr.open_group(root / "unslashed.zarr", mode="r+").create_array("targets/extra", shape=(4,), dtype="int8")[:] = [1, 2, 3, 4]
    (root / ".faults").write_text(json.dumps({"/": "unslashed"}))
    try:
        listed = open_store(f"{base}/unslashed.zarr").object_keys()
        pack(f"{base}/unslashed.zarr", tmp_path / "http.zarr.zip")
    finally:
        (root / ".faults").unlink()
    assert "targets/extra/c/0" in listed and "targets/logits/c/0/0" in listed, listed
    with zipfile.ZipFile(tmp_path / "http.zarr.zip") as z:
        assert {"targets/extra/zarr.json", "targets/extra/c/0"} <= set(z.namelist())


@pytest.mark.parametrize("status", ["403", "401", "500"])
def test_a_server_that_answers_a_folders_page_with_an_error_status_is_listed_without_it_or_named(status, faulty_http_root, tiny_store,
                                                                                                 tmp_path):
    """nginx without ``autoindex`` answers a folder's page 403 (a server asking credentials for it alone, 401): no
    index pages, as a 404 says, so verify checks and pack copies the objects the layout names. A 5xx is a one-line
    error saying the listing could not be read. Before, each was aiohttp's ClientResponseError raised through every
    command that lists a store: ``verify`` (which lists it to find added arrays) and ``pack`` failed with a traceback."""
    import shutil

    root, base = faulty_http_root
    shutil.copytree(tiny_store, root / f"pages{status}.zarr")
    url = f"{base}/pages{status}.zarr"
    (root / ".faults").write_text(json.dumps({"/": status}))
    try:
        runs = [CliRunner().invoke(main, args) for args in (["verify", url], ["pack", url, str(tmp_path / "http.zarr.zip")])]
    finally:
        (root / ".faults").unlink()
    if status == "500":
        for r in runs:
            assert r.exit_code == 1 and r.output.startswith(f"Error: cannot read the list of its objects from {url!r}: "
                                                            "ClientResponseError: 500"), r.output
            assert "nothing says the store is damaged" in r.output and len(r.output.splitlines()) == 1, r.output
        return
    assert [r.exit_code for r in runs] == [0, 0], [r.output for r in runs]
    pack(tiny_store, tmp_path / "local.zarr.zip")
    assert (tmp_path / "http.zarr.zip").read_bytes() == (tmp_path / "local.zarr.zip").read_bytes()


def test_an_index_page_that_cannot_be_read_stops_pack_in_one_line_not_a_zip_without_its_objects(faulty_http_root,
                                                                                                    tiny_store, tmp_path):
    """An index page that cannot be read (here its read times out; a connection refused or reset alike) is not a folder
    without a page: the listing skipped it as it skips a 404, and pack wrote a zip without the objects below it (an added
    array's chunks: its every reader then reads fill values), and verify passed. Both stop with the listing's one line."""
    import shutil

    import zarr

    root, base = faulty_http_root
    shutil.copytree(tiny_store, root / "stalled.zarr")
    zarr.open_group(root / "stalled.zarr", mode="r+").create_array("extra/a", shape=(8, 6), chunks=(4, 6), dtype="int32")[:] = 7
    url = f"{base}/stalled.zarr"
    (root / ".faults").write_text(json.dumps({"stalled.zarr/extra/a/c/": "stall"}))
    timeout = ["--storage-option", "client_kwargs.timeout.sock_read=1"]
    try:
        runs = [CliRunner().invoke(main, [*args, *timeout]) for args in (["pack", url, str(tmp_path / "http.zarr.zip")], ["verify", url])]
    finally:
        (root / ".faults").unlink()
    for r in runs:
        assert r.exit_code == 1 and r.output.startswith(f"Error: cannot read the list of its objects from {url!r}: "), r.output
        assert len(r.output.splitlines()) == 1, r.output
    assert not (tmp_path / "http.zarr.zip").exists()


@pytest.mark.parametrize("status", ["429", "408"])
def test_an_index_page_refused_for_now_stops_pack_in_one_line_not_a_zip_without_its_objects(status, faulty_http_root, tiny_store,
                                                                                            tmp_path):
    """A folder's page answered 429 (too many requests: the listing asks for 4 pages at once) or 408 (a request
    timeout) is a page not had this time, not a folder without one (a 404, a 403): it was skipped as those are, and pack
    wrote a zip without the objects below it (an added array's chunks), exit 0. Both stop with the listing's one line."""
    import shutil

    import zarr

    root, base = faulty_http_root
    shutil.copytree(tiny_store, root / f"busy{status}.zarr")
    zarr.open_group(root / f"busy{status}.zarr", mode="r+").create_array("extra/a", shape=(8, 6), chunks=(4, 6), dtype="int32")[:] = 7
    url = f"{base}/busy{status}.zarr"
    (root / ".faults").write_text(json.dumps({f"busy{status}.zarr/extra/a/c/": status}))
    try:
        runs = [CliRunner().invoke(main, args) for args in (["pack", url, str(tmp_path / "http.zarr.zip")], ["verify", url])]
    finally:
        (root / ".faults").unlink()
    for r in runs:
        assert r.exit_code == 1 and r.output.startswith(f"Error: cannot read the list of its objects from {url!r}: "
                                                        f"ClientResponseError: {status}"), r.output
        assert len(r.output.splitlines()) == 1, r.output
    assert not (tmp_path / "http.zarr.zip").exists()


def test_a_server_asking_for_credentials_is_named_and_headers_pass_them(faulty_http_root, tiny_store):
    """A 401/403 for the root zarr.json says the server refuses access and how to pass credentials (it said "no store
    at ...; check the URL"); the --storage-option the message names is the one that works."""
    import shutil

    root, base = faulty_http_root
    if not (root / "tiny.zarr").exists():
        shutil.copytree(tiny_store, root / "tiny.zarr")
    (root / ".faults").write_text(json.dumps({"tiny.zarr": "auth"}))  # every object of the store
    try:
        r = CliRunner().invoke(main, ["info", f"{base}/tiny.zarr"])
        assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1, r.output
        assert f"'{base}/tiny.zarr' refuses access ({base}/tiny.zarr/zarr.json: HTTP 401" in r.output, r.output
        assert "--storage-option 'headers.Authorization=Bearer TOKEN'" in r.output and "no store" not in r.output, r.output
        r = CliRunner().invoke(main, ["verify", f"{base}/tiny.zarr", "--storage-option", "headers.Authorization=Bearer secret"])
        assert r.exit_code == 0 and "ok    checksums" in r.output, r.output
        # a bucket served over HTTP(S) answers a missing key 403 where it may not be listed: both causes are named
        (root / ".faults").write_text(json.dumps({"tiny.zarr": "403"}))
        r = CliRunner().invoke(main, ["info", f"{base}/tiny.zarr"])
        assert r.exit_code == 1 and "HTTP 403" in r.output and "or there is no store there" in r.output, r.output
        assert "check the URL, or pass the credentials" in r.output, r.output
    finally:
        (root / ".faults").unlink()


def test_an_s3_extract_killed_before_its_manifest_resumes(s3, tiny_store):
    """Killed after the arrays' metadata but before the manifest (the last object create_or_resume writes): the
    rerun creates the store again, as for a local folder, instead of refusing it as "not a kdcache store"."""
    from pathlib import Path

    import s3fs

    from conftest import TINY_TOML

    fs = s3fs.S3FileSystem(**s3, skip_instance_cache=True)
    prefix = f"{BUCKET}/killed-early.zarr"
    for meta in Path(tiny_store).rglob("zarr.json"):
        key = meta.relative_to(tiny_store).as_posix()
        body = json.loads(meta.read_text())
        if key == "zarr.json":
            body["attributes"].pop("kdcache")
        fs.pipe(f"{prefix}/{key}", json.dumps(body).encode())
    url = f"s3://{prefix}"
    info = kdcache.extract(kdcache.load_pipeline(TINY_TOML), url, storage_options=s3)
    assert info["complete"]
    assert_same_store(url, tiny_store, options_a=s3)


def test_zip_chains_are_never_write_targets(s3):
    from conftest import TINY_TOML

    for url in (f"zip::s3://{BUCKET}/new.zarr.zip", "zip::http://127.0.0.1:1/x.zarr.zip"):
        with pytest.raises(StoreError, match="a zip store is write-once and opened read-only"):
            kdcache.extract(kdcache.load_pipeline(TINY_TOML), url, storage_options=s3 if "s3" in url else None)


def test_rows_of_a_folder_over_plain_http_are_read_from_whole_shards(plain_http_root):
    """A server that ignores Range answers a partial read with the whole object: rows inside a shard are read by
    fetching the whole shard (SHARING.md), never parsed from the wrong bytes."""
    from conftest import TINY_TOML
    from kdcache.stats import stats
    from kdcache.store import LOGITS, layer_path

    root, base = plain_http_root
    local = str(root / "rows.zarr")  # features.3 in chunks of 1 row: a partial read fetches byte ranges of its shards
    kdcache.extract(kdcache.load_pipeline(TINY_TOML, ["extract.chunk_mb=0.001"]), local, overwrite=True)
    http, local = open_store(f"{base}/rows.zarr"), open_store(local)
    assert local.manifest["geometry"]["chunk_rows"]["targets/layers/features.3"] == 1
    for path in (LOGITS, layer_path("features.3")):
        for start, stop in ((3, 5), (14, 40), (48, 50)):
            np.testing.assert_array_equal(http.read(path, start, stop), local.read(path, start, stop), err_msg=f"{path} {start}:{stop}")
    assert verify(f"{base}/rows.zarr")["ok"]  # every check reads as training does
    remote, here = stats(f"{base}/rows.zarr"), stats(str(root / "rows.zarr"))  # stats reads inner chunk by inner chunk
    assert {k: v for k, v in remote.items() if k != "location"} == {k: v for k, v in here.items() if k != "location"}


def test_zarrs_own_partial_reads_of_a_folder_over_plain_http_are_cut_from_the_whole_objects(plain_http_root):
    """``Store.array`` is a zarr array: its slices read a shard's index (the object's last bytes) and then the inner chunks
    the rows are in (byte ranges of the object). A server that ignores Range answers each with the whole object, from
    which the range asked for is cut (``_read_bounded``): the rows are the folder's."""
    from conftest import TINY_TOML
    from kdcache.store import LOGITS, layer_path

    root, base = plain_http_root
    local = str(root / "sliced.zarr")  # features.3 in chunks of 1 row: a slice reads byte ranges of its shards
    kdcache.extract(kdcache.load_pipeline(TINY_TOML, ["extract.chunk_mb=0.001"]), local, overwrite=True)
    http, here = open_store(f"{base}/sliced.zarr"), open_store(local)
    for path in (LOGITS, layer_path("features.3")):
        for rows in (slice(3, 5), slice(14, 40), slice(48, 50)):
            np.testing.assert_array_equal(http.array(path)[rows], here.array(path)[rows], err_msg=f"{path} {rows}")


@pytest.mark.parametrize("damage", [None, "flip", "cut", "gone"])
def test_a_read_of_several_shards_over_plain_http_is_the_folders_a_damaged_one_named_alike(plain_http_root, tmp_path, zoo_env, damage):
    """A read of several whole shards over http fetches the next objects while one is decoded into the one array returned
    (the last shard partial, its inner chunk too): the folder's rows, and a damaged middle shard the folder's error."""
    import shutil

    from kdcache.store import LOGITS
    from test_scale import deep_pipeline

    root, base = plain_http_root
    zoo_env(N=11, DEPTH=1)
    here, there = tmp_path / "s.zarr", root / f"several-{damage}.zarr"
    kdcache.extract(deep_pipeline(1, rows_per_shard=4), str(here))
    shutil.copytree(here, there)
    for folder in (here, there):
        shard = folder / LOGITS / "c/1/0"
        raw = shard.read_bytes()
        if damage == "flip":
            shard.write_bytes(raw[:5] + bytes([raw[5] ^ 0xFF]) + raw[6:])
        elif damage == "cut":
            shard.write_bytes(raw[: len(raw) // 2])
        elif damage == "gone":
            shard.unlink()
    local, remote = open_store(str(here)), open_store(f"{base}/{there.name}")
    for start, stop in ((0, 11), (1, 11), (4, 11), (0, 8)):
        said = []
        for store in (local, remote):
            try:
                said.append(store.read(LOGITS, start, stop))
            except StoreError as e:
                said.append(f"{type(e).__name__}: {str(e).replace(store.location, 'STORE')}")
        if damage is None:
            np.testing.assert_array_equal(said[0], said[1])
        else:  # alike but for the fix: one the reader of an http server's copy can make (store.redo_fix)
            here_fix = "copy the store again, or redo the shard: "
            there_fix = ("a store read over HTTP cannot be changed by its reader: have the server's copy replaced from its source, "
                         "or copy the store to a local folder and redo the shard there: ")
            assert here_fix in said[0] and said[0].replace(here_fix, there_fix) == said[1], said
            assert "shard 1 of targets/logits" in said[0], said


def test_a_shard_read_whole_from_s3_is_one_get(s3, tiny_store):
    """Counted on the S3 client itself (botocore's before-call events): each whole-shard read is one GetObject. A plain
    GET made s3fs send a HeadObject first, to learn the size (it fetches objects over its block size in parallel
    parts): two requests, two round trips, per shard and column of every streamed epoch."""
    from conftest import TINY_TOML

    url = f"s3://{BUCKET}/one-get.zarr"
    kdcache.extract(kdcache.load_pipeline(TINY_TOML), url, storage_options=s3)
    store, local = open_store(url, storage_options=s3), open_store(tiny_store)
    for path in store.paths():
        store.read(path, 0, 16)  # opening: metadata of the store and each array, done markers, digests
    calls: list[str] = []
    fs = store.group.store.fs
    fs.s3.meta.events.register("before-call.s3", lambda model, **_: calls.append(model.name))
    for path in store.paths():
        for shard in (1, 2, 3):
            lo, hi = store.shard_rows(shard)
            np.testing.assert_array_equal(store.read(path, lo, hi), local.read(path, lo, hi))
    assert calls == ["GetObject"] * 15, calls
    calls.clear()
    assert store.raw_object("targets/logits/c/1/0", at_most=fs.default_block_size + 1) == local.raw_object("targets/logits/c/1/0")
    assert calls == ["GetObject"], calls  # one that may be large too: streamed, refused past its bound (no HEAD to learn its size)


@pytest.mark.parametrize("scheme, command", [*(("s3", c) for c in ("info", "verify", "stats", "pack", "export", "import", "train")),
                                             *(("http", c) for c in ("info", "verify", "stats", "pack", "export", "train"))])
def test_every_command_names_an_endpoint_that_never_answers_within_the_probe_timeouts(scheme, command, silent_endpoint, tiny_store, tmp_path, monkeypatch):
    """An endpoint that takes the connection and never answers (a proxy or firewall that swallows requests) held
    every command that opens an s3:// store for ~7 minutes (s3fs's 5 passes of botocore's 5 tries of up to 15 s), and
    one that opens an http(s):// store for 300 s (aiohttp's default), before its one-line error; `import` to S3 waited
    without end. The first look at the store now gives up after the probe's tries (``storage.PROBE_*``, shortened here),
    names how long it tried and the setting to raise; nothing is written."""
    from conftest import TINY_TOML
    from kdcache import storage

    monkeypatch.setattr(storage, "PROBE_CONNECT_S", 1.0)
    monkeypatch.setattr(storage, "PROBE_READ_S", 0.2)  # the endpoint never answers: any wait gives up, and 13 cases pay it
    monkeypatch.setattr(storage, "PROBE_ATTEMPTS", 2)
    endpoint, held = silent_endpoint
    url = f"s3://{BUCKET}/silent.zarr" if scheme == "s3" else f"{endpoint}/silent.zarr"
    if command == "import":
        kdcache_export = CliRunner().invoke(main, ["export", tiny_store, str(tmp_path / "t.h5")])
        assert kdcache_export.exit_code == 0, kdcache_export.output
    args = {"info": [url], "verify": [url], "stats": [url], "pack": [url, tmp_path / "s.zarr.zip"], "export": [url, tmp_path / "s.h5"],
            "import": [tmp_path / "t.h5", url], "train": [TINY_TOML, "--cache", url, "--out", tmp_path / "run"]}[command]
    options = [f"--storage-option={o}" for o in (f"endpoint_url={endpoint}", "key=testing", "secret=testing")] if scheme == "s3" else []
    result = CliRunner().invoke(main, [command, *map(str, args), *options])
    returned = time.monotonic()
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1, result.output  # verify's too: it checked nothing (once a report: FAIL open)
    said = lines[0]
    if scheme == "s3":
        assert re.match(rf"Error: cannot reach '{url}': Read timeout on endpoint URL: .*; gave up after \d+ s \(2 tries of up to 0\.2 s "
                        r"each\); for an endpoint that is slow rather than down raise --storage-option config_kwargs.read_timeout=SECONDS; "
                        r"check the URL", said), result.output
        assert len(held) == 2, "one connection a try: s3fs does not try again on top of botocore"
    else:
        assert re.match(rf"Error: cannot reach '{url}': Timeout on reading data from socket; gave up after \d+ s \(1 try of up to 0\.2 s\); "
                        r"for an endpoint that is slow rather than down raise --storage-option client_kwargs.timeout.sock_read=SECONDS; "
                        r"check the URL", said), result.output
        assert len(held) == 1
    # from its first try, not from the command's start (which the bound of 12 s held: train's and import's start, its
    # pipeline and first looks, is what a loaded box makes long): a try waits 0.2 s; botocore's backoff between tries is
    # under 1 s
    took = returned - held.times[0]
    assert took < 3 * len(held) * (0.2 + 1), f"{took:.1f} s"
    assert sorted(p.name for p in tmp_path.iterdir()) == (["t.h5"] if command == "import" else []), "nothing written"


def test_a_storage_option_the_filesystem_does_not_take_is_named_as_such(s3, http_root, tiny_store):
    """s3fs and aiohttp make their clients at the first request, so an option they do not take (the `block_size=...`
    SHARING.md once gave as an example is not s3fs's) failed in the first look at the store: "cannot reach ...; gave up
    after 0 s" for s3://, "cannot reach ... check that the server is up" over HTTP and, for zip::http, "no store in ...:
    the zip holds no zarr.json" or an HTTP 400 quoting the whole zip."""
    import shutil

    root, base = http_root
    shutil.copytree(tiny_store, root / "options.zarr", dirs_exist_ok=True)
    pack(tiny_store, root / "options.zarr.zip")
    s3_options = [f"--storage-option={k}={v}" for k, v in s3.items()]
    for location, given in ((f"s3://{BUCKET}/options.zarr", [*s3_options, "--storage-option=block_size=5242880"]),
                            (f"s3://{BUCKET}/options.zarr", [*s3_options, "--storage-option=client_kwargs.bogus=1"]),
                            (f"{base}/options.zarr", ["--storage-option=bogus=1"]),
                            (f"zip::{base}/options.zarr.zip", ["--storage-option=http.bogus=1"])):
        for command in ("info", "verify"):
            r = CliRunner().invoke(main, [command, location, *given])
            said = r.output.strip()
            assert r.exit_code == 1 and said.startswith(f"Error: cannot open {location!r}: a storage option the filesystem does not take ("), r.output
            assert "unexpected keyword argument" in said and said.endswith("check the --storage-option values against the filesystem's "
                                                                          "own arguments (s3fs: S3FileSystem's, e.g. default_block_size)"), r.output
    r = CliRunner().invoke(main, ["info", f"s3://{BUCKET}/options.zarr", *s3_options, "--storage-option=default_block_size=5242880"])
    assert r.exit_code == 1 and "no store at" in r.output, r.output  # the option s3fs takes: it opens (nothing is there)
    # of the type s3fs does not take: it failed at the first read, as "'s3://...' is not a zarr v3 group ('>' not supported ...)"
    shutil.copytree(tiny_store, root / "sized.zarr", dirs_exist_ok=True)
    s3fs = pytest.importorskip("s3fs")
    s3fs.S3FileSystem(**s3, skip_instance_cache=True).put(str(root / "sized.zarr"), f"{BUCKET}/sized.zarr", recursive=True)
    assert CliRunner().invoke(main, ["info", f"s3://{BUCKET}/sized.zarr", *s3_options]).exit_code == 0
    r = CliRunner().invoke(main, ["info", f"s3://{BUCKET}/sized.zarr", *s3_options, "--storage-option=default_block_size=5MB"])
    assert r.exit_code == 1 and r.output == ("Error: storage option default_block_size must be a number of bytes, got str '5MB'; pass "
                                             "e.g. --storage-option default_block_size=5242880 (5 MiB)\n"), r.output


def test_a_mapping_storage_option_takes_none_and_any_mapping(http_root, tiny_store):
    """The options that hold settings (``client_kwargs``, ``headers``…) refuse one value (tests/test_bad_input.py) but
    take what the filesystems take: None (s3fs's default) and any mapping (aiohttp's ``CIMultiDict`` of headers)."""
    import shutil

    from multidict import CIMultiDict

    root, base = http_root
    shutil.copytree(tiny_store, root / "mapped.zarr", dirs_exist_ok=True)
    for options in ({"client_kwargs": None}, {"headers": CIMultiDict(Accept="*/*")},
                    {"client_kwargs": {"timeout": {"sock_read": np.int64(60)}}}):  # numpy's seconds: once refused as not a number
        assert open_store(f"{base}/mapped.zarr", storage_options=options).complete, options


def test_storage_options_of_a_zip_behind_a_url_go_under_its_fetching_layer_and_a_zip_url_is_named_as_such(s3, http_root, tiny_store):
    """fsspec gives a chain's options not under a scheme to its zip layer, which dropped them unused: `zip::s3://...
    --storage-option endpoint_url=...` said "Unable to locate credentials", and `headers.Authorization` never reached
    the server. A `.zip` URL without `zip::` said "no store" ("run kdcache extract" on S3);
    a `client_kwargs.timeout` that is neither seconds nor settings was "cannot reach ...; check that the server is up"."""
    import s3fs

    root, base = http_root
    pack(tiny_store, root / "chain.zarr.zip")
    s3fs.S3FileSystem(**s3, skip_instance_cache=True).put(str(root / "chain.zarr.zip"), f"{BUCKET}/chain.zarr.zip")
    s3fs.S3FileSystem.clear_instance_cache()  # an instance an earlier test listed the bucket with would not see the new object
    plain = [f"--storage-option={k}={v}" for k, v in s3.items()]
    layered = [f"--storage-option=s3.{k}={v}" for k, v in s3.items()]
    cases = [(f"zip::s3://{BUCKET}/chain.zarr.zip", plain, "storage options ['endpoint_url', 'key', 'secret'] of "
              f"'zip::s3://{BUCKET}/chain.zarr.zip' would go to its zip layer, which does not use them; the s3 layer that fetches "
              "the file takes its options under its scheme: --storage-option s3.endpoint_url=VALUE"),
             (f"zip::{base}/chain.zarr.zip", ["--storage-option=headers.Authorization=Bearer secret"], "--storage-option http.headers.Authorization=VALUE"),
             (f"s3://{BUCKET}/chain.zarr.zip", plain, f"and it names a zip file; a zip behind a URL is read as 'zip::s3://{BUCKET}/chain.zarr.zip'"),
             (f"{base}/chain.zarr.zip", [], f"HTTP 404) and it names a zip file; a zip behind a URL is read as 'zip::{base}/chain.zarr.zip'"),
             (f"{base}/chain.zarr.zip", ["--storage-option=client_kwargs.timeout=60s"], "storage option client_kwargs.timeout must be "
              "seconds or settings, got str '60s'; pass e.g. --storage-option client_kwargs.timeout=60")]
    for location, given, said in cases:
        r = CliRunner().invoke(main, ["info", location, *given])
        assert r.exit_code == 1 and r.output.startswith("Error: ") and len(r.output.strip().splitlines()) == 1, r.output
        assert said in r.output and "Traceback" not in r.output, r.output
    for location, given in ((f"zip::s3://{BUCKET}/chain.zarr.zip", layered), (f"zip::{base}/chain.zarr.zip", [])):
        r = CliRunner().invoke(main, ["info", location, "--json", *given])
        assert r.exit_code == 0 and json.loads(r.output)["complete"], r.output


def test_an_http_answer_that_quotes_a_long_text_is_cut_to_one_line():
    """The HTTP status's reason (aiohttp's message; for a response it cannot parse, the bytes it got) went into the error
    whole: a server answering with a long one printed it all (a misparsed 206 of a zip: tens of KB of its bytes)."""
    import threading

    server = socket.create_server(("127.0.0.1", 0))
    reason = "Internal Error " + "x" * 4000  # under aiohttp's 8190-byte line limit

    def answer() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn = server.accept()[0]
                conn.recv(65536)
                conn.sendall(f"HTTP/1.1 500 {reason}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode())
                conn.close()

    threading.Thread(target=answer, daemon=True).start()
    url = f"http://127.0.0.1:{server.getsockname()[1]}/long.zarr"
    try:
        r = CliRunner().invoke(main, ["info", url])
    finally:
        server.close()
    assert r.exit_code == 1 and r.output.startswith(f"Error: cannot reach {url!r} ({url}/zarr.json: HTTP 500 Internal Error xxx"), r.output[:500]
    assert len(r.output.strip().splitlines()) == 1 and len(r.output) < 500, r.output[:500]


def test_an_http_timeout_is_given_in_seconds_or_by_setting_from_the_command_line(http_root, tiny_store, silent_endpoint, monkeypatch):
    """aiohttp takes a ClientTimeout object, which a command line cannot spell: client_kwargs.timeout given as seconds
    (the whole request) or as settings becomes one. The user's timeout is the first look's too; a setting aiohttp does
    not have is named in one line."""
    import shutil

    from kdcache import storage

    monkeypatch.setattr(storage, "PROBE_READ_S", 60.0)
    root, base = http_root
    shutil.copytree(tiny_store, root / "timeouts.zarr", dirs_exist_ok=True)
    for given in ("client_kwargs.timeout=30", "client_kwargs.timeout.sock_read=30"):
        result = CliRunner().invoke(main, ["info", f"{base}/timeouts.zarr", "--json", f"--storage-option={given}"])
        assert result.exit_code == 0 and json.loads(result.output)["complete"], result.output
    options = {"client_kwargs": {"timeout": {"sock_read": 2}}}
    assert storage._fsspec_options(base, options)["client_kwargs"]["timeout"].sock_read == 2 and options["client_kwargs"]["timeout"] == {"sock_read": 2}
    url, held = silent_endpoint
    result = CliRunner().invoke(main, ["info", f"{url}/s.zarr", "--storage-option=client_kwargs.timeout.sock_read=2"])
    waited = time.monotonic() - held.times[0]  # from its first try: the command's start, long on a loaded box, left out
    assert result.exit_code == 1 and "gave up after 2 s (1 try of up to 2 s)" in result.output and waited < 10, (waited, result.output)
    result = CliRunner().invoke(main, ["info", f"{base}/timeouts.zarr", "--storage-option=client_kwargs.timeout.read=30"])
    assert result.exit_code == 1 and result.output == (
        "Error: storage option client_kwargs.timeout = {'read': 30} names settings aiohttp does not have; use total, connect, sock_connect "
        "or sock_read (seconds), e.g. --storage-option client_kwargs.timeout.sock_read=60\n"), result.output


def test_an_http_timeout_given_from_python_as_aiohttps_own_is_taken_as_it_is(http_root, tiny_store):
    """From Python, client_kwargs.timeout may be what aiohttp takes, a ClientTimeout: it reaches aiohttp as it is (seconds
    and settings become one; anything else is refused by name)."""
    import shutil

    import aiohttp

    from kdcache import storage

    root, base = http_root
    shutil.copytree(tiny_store, root / "own-timeout.zarr", dirs_exist_ok=True)
    timeout = aiohttp.ClientTimeout(total=30, sock_read=20)
    options = {"client_kwargs": {"timeout": timeout}}
    assert storage._fsspec_options(base, options)["client_kwargs"]["timeout"] is timeout
    assert open_store(f"{base}/own-timeout.zarr", storage_options=options).complete


class SwallowingProxy:
    """A TCP proxy on 127.0.0.1 in front of ``target`` (host, port) that passes everything on until ``swallow()``;
    from then on it takes what the client sends and answers nothing (an endpoint that stopped answering mid-run)."""

    def __init__(self, target: tuple[str, int]):
        import threading

        self.target, self.silent, self.conns = target, threading.Event(), []
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def swallow(self) -> None:
        self.silent.set()

    def _accept(self) -> None:
        import threading

        while True:
            try:
                client = self.server.accept()[0]
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self.conns += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                if not self.silent.is_set():
                    dst.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        for s in (self.server, *self.conns):
            s.close()


def ended(proc: subprocess.Popen) -> str:
    """What an ended process said on stderr (nothing while it runs: a read would wait for it)."""
    return "" if proc.poll() is None else proc.stderr.read().decode()[-2000:]


@pytest.mark.slow
def test_an_s3_endpoint_that_stops_answering_mid_extract_fails_it_in_one_line(s3, tmp_path):
    """An S3 endpoint that stops answering while an extract writes its shards: the extract fails in one line, exit 1,
    after botocore's read_timeout and s3fs's retries, and the shards written are kept (the next test: a PUT sent after
    the endpoint fell silent held the writer for ever)."""
    from urllib.parse import urlparse

    from reference import done_at_least, shards_done, slow_extract, write_toml

    toml = write_toml(tmp_path / "p.toml", "extract.rows_per_shard=8", "extract.batch_size=4")
    endpoint = urlparse(s3["endpoint_url"])
    proxy = SwallowingProxy((endpoint.hostname, endpoint.port))
    url = f"s3://{BUCKET}/swallowed.zarr"
    # read_timeout 20 s: every request before the endpoint falls silent must be answered within it (the S3 server shares
    # this process, and two cores with the other xdist worker). With 1, 2 and 4 s the extract ended before the proxy fell
    # silent in CI runs, a read timeout (at a load of 17 an answer took over 4 s); 10 s left little over the 6 s an answer
    # took beside a loaded CI run (load 16); after the silence the test waits two of them (a request, then the lock's release)
    # s3fs's own retries (a class attribute, not an option): 1 pass, not 5. Each failed request waits read_timeout and
    # s3fs's backoff once a pass: 5 passes took 25 s (the failed shard's PUT, then the lock's release) to the same line,
    # 2 passes 10 s; a pass more only repeats the same timeout, the error it ends in is the same
    fewer = "import s3fs; s3fs.S3FileSystem.retries = 1\nfrom kdcache.cli import main; main()"
    # the third shard's first item waits until the endpoint is silent: the extract has sent its two shards and sends
    # nothing more while the test looks at them (without looking at S3 while it writes them: each look is the in-process
    # server's work too) and silences the endpoint. It was let run on as the test polled S3 for two shards, and silenced
    # then: every request of its start, its shards and the test's looks shared the loaded server until that moment
    hold = tmp_path / "hold"
    hold.touch()
    proc = slow_extract(toml, url, storage_options={**s3, "endpoint_url": proxy.url,
                                                    "config_kwargs": {"read_timeout": 20, "retries": {"max_attempts": 0}}},
                        command=[sys.executable, "-c", fewer], held=(hold, 16), shards=0)
    try:
        deadline = time.monotonic() + 240  # a loaded box took more than 60 s to start an extract
        while not (list(tmp_path.glob("hold.held-*")) and done_at_least(url, 2, s3)):  # its two shards' writes may end after
            assert proc.poll() is None and time.monotonic() < deadline, \
                f"the extract ended (or stalled) before the endpoint fell silent: {proc.poll()} {ended(proc)}"
            time.sleep(0.1)
        proxy.swallow()
        swallowed_at = time.monotonic()
        hold.unlink()
        code = proc.wait(timeout=240)
        took = time.monotonic() - swallowed_at
    finally:
        hold.unlink(missing_ok=True)
        if proc.poll() is None:
            proc.kill()
        proxy.close()
    lines = proc.stderr.read().decode().strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("Error: ") and "timeout" in lines[0].lower(), lines
    assert shards_done(url, s3) == 2  # written before the endpoint fell silent, and kept
    print(f"failed {took:.0f} s after the endpoint stopped answering: {lines[0][:200]}")


def test_a_put_to_an_s3_endpoint_that_stopped_answering_times_out(s3):
    """botocore sends ``Expect: 100-continue`` with a PUT and aiohttp waits for the server's answer to it with no
    timeout: a shard's PUT sent after the endpoint stopped answering held the writer for ever (a GPU job's allocation
    with it; measured: still waiting after 30 s with read_timeout=2, here and with a raw aiohttp PUT). A writable
    store's PUTs go without that header, so botocore's read_timeout applies."""
    import threading
    from urllib.parse import urlparse

    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    from kdcache.storage import zarr_store

    endpoint = urlparse(s3["endpoint_url"])
    proxy = SwallowingProxy((endpoint.hostname, endpoint.port))
    options = {"endpoint_url": proxy.url, "key": "testing", "secret": "testing", "config_kwargs": {"read_timeout": 2, "retries": {"max_attempts": 0}}}
    store = zarr_store(f"s3://{BUCKET}/put-timeout.zarr", options, read_only=False)
    store.fs.retries = 1  # s3fs's own retries: one pass
    body = default_buffer_prototype().buffer.from_bytes(b"x" * 1000)
    # a live connection in the pool, as mid-run: a PUT answered, sent again until it is (the in-process server, which a
    # loaded box has seen take past 3 s to answer, may let it time out, which closes its connection; a read timeout of
    # 6 s was relied on, and then a loaded box's answer could still come later)
    deadline = time.monotonic() + 120
    while True:
        try:
            sync(store.set("warm", body))
            break
        except Exception as e:  # noqa: BLE001 - a timeout is sent again, anything else raised
            if type(e).__name__ not in ("ReadTimeoutError", "OSError", "TimeoutError", "FSTimeoutError") or time.monotonic() > deadline:
                raise
    proxy.swallow()
    outcome: list[BaseException | None] = []

    def put() -> None:
        try:
            sync(store.set("after", body))
            outcome.append(None)
        except BaseException as e:  # noqa: BLE001 - the test's to look at
            outcome.append(e)

    started = time.monotonic()
    thread = threading.Thread(target=put, daemon=True)
    thread.start()
    thread.join(timeout=60)
    try:
        assert outcome, "the PUT still waits 60 s after the endpoint stopped answering"
        assert type(outcome[0]).__name__ in ("ReadTimeoutError", "OSError", "TimeoutError", "FSTimeoutError"), repr(outcome[0])
        assert time.monotonic() - started < 30
    finally:
        proxy.close()


def test_only_the_first_look_at_an_endpoint_has_the_short_timeouts(s3, monkeypatch):
    """The probe's short timeouts (and a new S3 client: ~85 ms a call) are for the first look at an endpoint in a
    process; later looks (the next open, a forked DataLoader worker's) take the usual filesystem with its retries,
    which ride out a slow moment in the middle of a run."""
    from kdcache import locking, storage

    probes = []
    real = storage.probe_filesystem
    monkeypatch.setattr(storage, "probe_filesystem", lambda *a: probes.append(a) or real(*a))
    monkeypatch.setattr(storage, "REACHED", set())
    options = {**s3, "config_kwargs": {"read_timeout": 20}}  # options of their own: an endpoint not looked at yet
    for name in ("first.zarr", "second.zarr", "first.zarr"):
        assert not storage.exists(f"s3://{BUCKET}/{name}", options)
    assert len(probes) == 1
    assert not storage.exists(f"s3://{BUCKET}/first.zarr", s3)  # other options: another first look
    assert len(probes) == 2 and len(storage.REACHED) == 2
    fresh = {**s3, "config_kwargs": {"read_timeout": 21}}
    locking.refuse_if_being_written(f"s3://{BUCKET}/third.zarr", fresh)  # extract's first look, at the lock object
    assert not storage.exists(f"s3://{BUCKET}/third.zarr", fresh) and len(probes) == 3, "the store's own look: not a second probe"


def test_a_zip_behind_an_endpoint_that_never_answers_is_named_within_the_probe_timeouts(silent_endpoint, http_root, tiny_store, tmp_path, monkeypatch):
    """``zip::http(s)://`` reads a packed store by byte range; a server that never answered held it for aiohttp's 300 s.
    The first look (the file's headers) gives up as a folder's does, naming the chain's own setting (the http layer's
    options sit under its scheme), which is converted as a folder's is; a live server's zip reads as before."""
    from kdcache import storage

    monkeypatch.setattr(storage, "PROBE_CONNECT_S", 1.0)
    monkeypatch.setattr(storage, "PROBE_READ_S", 0.5)  # the server never answers: any wait gives up
    endpoint, held = silent_endpoint
    for given, wait in (([], 0.5), (["--storage-option=http.client_kwargs.timeout.sock_read=1"], 1)):
        before = len(held)
        result = CliRunner().invoke(main, ["info", f"zip::{endpoint}/t{wait}.zarr.zip", *given])
        returned = time.monotonic()
        assert result.exit_code == 1, result.output
        # one request, as the message says: fsspec's info asks again with a GET after a HEAD that timed out (twice the wait)
        assert len(held) - before == 1, f"{len(held) - before} requests"
        # from its one try, not from the command's start (which the bound of 10 s held, and a loaded box makes long)
        took = returned - held.times[before]
        assert took < 3 * (wait + 1), f"{took:.1f} s"
        assert re.fullmatch(rf"Error: cannot reach 'zip::{endpoint}/t{wait}.zarr.zip': Timeout on reading data from socket; gave up after "
                            rf"\d+ s \(1 try of up to {wait} s\); for an endpoint that is slow rather than down raise --storage-option "
                            r"http.client_kwargs.timeout.sock_read=SECONDS; check the URL, --storage-option values and credentials\n",
                            result.output), result.output
    root, base = http_root
    pack(tiny_store, str(root / "first-look.zarr.zip"))
    result = CliRunner().invoke(main, ["info", f"zip::{base}/first-look.zarr.zip", "--json", "--storage-option=http.client_kwargs.timeout=30"])
    assert result.exit_code == 0 and json.loads(result.output)["complete"], result.output


@pytest.mark.parametrize("location, options", [
    ("s3://bucket/t.zarr", {"anon": "False"}),
    ("s3://bucket/t.zarr", {"use_listings_cache": "no"}),
    ("https://example.invalid/t.zarr", {"simple_links": "false"}),
    ("zip::s3://bucket/t.zarr.zip", {"s3": {"requester_pays": "0"}}),
], ids=["s3-anon", "fsspec-cache-flag", "https", "zip-chain"])
def test_a_flag_option_given_as_a_string_is_refused_before_any_request(location, options, tmp_path):
    """Any non-empty string is true to s3fs and fsspec: storage_options={"anon": "False"} (or the command line's
    --storage-option anon=False, which JSON does not read as false) made every request anonymous. Refused, naming the
    option, before a request is made (nothing listens at these locations) and before anything is written."""
    key = next(iter(options))
    named = f"{key}.{next(iter(options[key]))}" if isinstance(options[key], dict) else key
    writable = location.startswith("s3://")  # http(s) and zip stores are read-only: extract says so first
    for call in (lambda: open_store(location, storage_options=options),
                 *([lambda: kdcache.extract(make_pipeline(), location, storage_options=options)] if writable else [])):
        with pytest.raises(StoreError, match=rf"^storage option {re.escape(named)} is true or false, got the string '"):
            call()


def test_a_flag_option_its_filesystem_takes_as_a_string_too_is_not_refused(monkeypatch):
    """An option defaulting to a bool that its filesystem also takes as a string is passed on: fsspec WebHDFS's
    session_verify (a CA bundle's path, given to requests' verify) and gcsfs's requester_pays (the project to bill;
    gcsfs is not installed here: a class of its name and signature stands in for it)."""
    from fsspec import AbstractFileSystem
    from fsspec.registry import _registry

    from kdcache import storage

    class GCSFileSystem(AbstractFileSystem):
        def __init__(self, project=None, token=None, requester_pays=False, version_aware=False, **kwargs):
            super().__init__(**kwargs)

    storage._flag_options.cache_clear()
    monkeypatch.setitem(_registry, "gcs", GCSFileSystem)
    try:
        storage._refuse_string_flags("webhdfs://namenode/t.zarr", {"session_verify": "/etc/ssl/certs/ca.pem"})
        storage._refuse_string_flags("gcs://bucket/t.zarr", {"requester_pays": "my-billing-project"})
        with pytest.raises(StoreError, match=r"^storage option version_aware is true or false, got the string 'no'"):
            storage._refuse_string_flags("gcs://bucket/t.zarr", {"version_aware": "no"})
        with pytest.raises(StoreError, match=r"^storage option requester_pays is true or false"):  # s3fs's is a bool alone
            storage._refuse_string_flags("s3://bucket/t.zarr", {"requester_pays": "False"})
    finally:
        storage._flag_options.cache_clear()


def test_torchrun_progress_reads_only_the_markers_of_shards_not_yet_seen_done(s3):
    """``extract --progress`` under torchrun: rank 0 looks at the store once a second for the shards every rank has done.
    Each look read every done marker: on S3 one GET per shard of the store per look (1,000 shards: ~1,000 GETs/s for the
    whole job). A marker only goes from not done to done within a run, so now each look reads the markers of the job's
    shards not yet seen done, and none once all are: counted on the S3 client (botocore's events)."""
    import io

    import s3fs

    from kdcache.distributed import _watch
    from kdcache.progress import Progress

    url = f"s3://{BUCKET}/watched.zarr"
    kdcache.extract(kdcache.load_pipeline(TINY_TOML), url, storage_options=s3)  # 4 shards: rows 0-15, 16-31, 32-47, 48-49
    fs = s3fs.S3FileSystem(**s3, skip_instance_cache=True)
    marker = f"{BUCKET}/watched.zarr/progress/done/c/{{}}"
    for s in (2, 3):
        fs.pipe(marker.format(s), b"\x00")  # the job's shards, still to write
    store = open_store(url, storage_options=s3)
    store.done()  # opening: the marker array's metadata
    read: list[str] = []
    store.group.store.fs.s3.meta.events.register("before-parameter-build.s3.GetObject", lambda params, **_: read.append(params["Key"]))
    markers = lambda: [k.rsplit("/", 1)[1] for k in read if "/progress/done/c/" in k]  # noqa: E731

    def wait_for(what) -> None:
        deadline = time.monotonic() + 30
        while not what():
            assert time.monotonic() < deadline, markers()
            time.sleep(0.01)

    bar = Progress(18, "extract", enabled=True, stream=io.StringIO())
    with _watch(store, [2, 3], bar, every=0.02):
        wait_for(lambda: markers().count("3") >= 3)
        fs.pipe(marker.format(2), b"\x01")  # one rank wrote shard 2
        wait_for(lambda: bar.done == 16)
        seen = len(markers())
        wait_for(lambda: markers().count("3") >= 3 + markers()[:seen].count("3"))  # three looks more: shard 3's marker alone
        assert markers()[seen:] == ["3"] * (len(markers()) - seen), markers()
        fs.pipe(marker.format(3), b"\x01")
        wait_for(lambda: bar.done == 18)
        seen = len(markers())
        time.sleep(0.2)  # ten looks: every shard of the job is done, none is read
        assert len(markers()) == seen, markers()[seen:]
    assert set(markers()) == {"2", "3"}, markers()  # shards 0 and 1 were done before the job: never read
    assert bar.done == 18


def test_torchrun_progress_looks_no_more_often_than_its_read_rate_allows(s3):
    """Early in a job nearly every shard is still to write, so reading only those still read one marker per shard per
    look: a 10,000-shard job's bar made 10,000 GETs a second. Looks now come as often as ``reads_per_s`` markers a
    second allow (here 10 for 2 markers: a look every 0.2 s, where ``every`` asks 0.02 s)."""
    import io

    import s3fs

    from kdcache.distributed import _watch
    from kdcache.progress import Progress

    url = f"s3://{BUCKET}/rated.zarr"
    kdcache.extract(kdcache.load_pipeline(TINY_TOML), url, storage_options=s3)
    fs = s3fs.S3FileSystem(**s3, skip_instance_cache=True)
    for s in (2, 3):
        fs.pipe(f"{BUCKET}/rated.zarr/progress/done/c/{s}", b"\x00")  # the job's shards, still to write
    store = open_store(url, storage_options=s3)
    store.done()
    asked: list[float] = []  # when each marker's GET was made, and when its answer came: a look is two of each
    answered: list[float] = []

    def ask(params, context, **_) -> None:
        context["kdcache_marker"] = "/progress/done/c/" in params["Key"]
        if context["kdcache_marker"]:
            asked.append(time.monotonic())

    def answer(context, **_) -> None:
        if context.get("kdcache_marker"):
            answered.append(time.monotonic())

    store.group.store.fs.s3.meta.events.register("before-parameter-build.s3.GetObject", ask)
    store.group.store.fs.s3.meta.events.register("after-call.s3.GetObject", answer)
    bar = Progress(18, "extract", enabled=True, stream=io.StringIO())
    with _watch(store, [2, 3], bar, every=0.02, reads_per_s=10):
        deadline = time.monotonic() + 120  # six looks: 1 s; a loaded box's are slower, never closer together
        while len(asked) < 12:
            assert time.monotonic() < deadline, (len(asked), len(answered))
            time.sleep(0.01)
    # from one look's last answer to the next look's first GET: 0.2 s here; unlimited, ``every``'s 0.02 s (it once counted
    # the looks of a fixed 1 s: 5 of 2 markers, 32 unlimited, and a loaded box's first look could come past that second)
    gaps = [asked[2 * k + 2] - answered[2 * k + 1] for k in range(5)]
    assert min(gaps) >= 0.19, [f"{g:.3f}" for g in gaps]


# A child process reading one shard of a store, after opening it (metadata, markers, digests read): what its peak resident
# memory (VmHWM: this process's own, not carried over exec as ru_maxrss is) grew by, and what the read said. At most
# 2 GiB of address space: an object read whole is a MemoryError, not a slow swap.
SHARD_READER = r"""
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (2 * 2**30, 2 * 2**30))
from kdcache.errors import StoreError
from kdcache.store import open_store

def peak():
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))

url, options, path, shard = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], int(sys.argv[4])
store = open_store(url, storage_options=options)
store.read(path, 0, 1)
before = peak()
try:
    store.read_shards(path, [shard])
    said = "read whole"
except (StoreError, MemoryError) as e:
    said = f"{type(e).__name__}: {e}"
print(json.dumps({"grew": peak() - before, "said": said}))
"""


def read_in_a_child(url: str, options: dict | None, path: str, shard: int) -> dict:
    r = subprocess.run([sys.executable, "-c", SHARD_READER, url, json.dumps(options or {}), path, str(shard)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("fault", ["giant", "lying"])
def test_a_shard_a_server_sends_larger_than_it_can_be_is_refused_in_memory_far_below_it(faulty_http_root, tiny_store, fault):
    """A server may send any number of bytes for an object: 64 GiB with a Content-Length saying so (refused by it, unread)
    or with none, its HEAD giving the object's true size (read in blocks, the read stopped past the shard's bound), and
    either way whatever Range was asked. The whole body was read into memory (fsspec's http reads a body whole)."""
    import shutil

    root, base = faulty_http_root
    name = f"sent-{fault}.zarr"
    shutil.copytree(tiny_store, root / name, dirs_exist_ok=True)
    (root / ".faults").write_text(json.dumps({f"{name}/targets/logits/c/1/0": fault}))
    try:
        seen = read_in_a_child(f"{base}/{name}", None, "targets/logits", 1)
    finally:
        (root / ".faults").unlink()
    size = f"{64 * 2**30:,} bytes, more than it can" if fault == "giant" else "more than"
    assert seen["said"].startswith(f"DamagedStoreError: '{base}/{name}' is damaged: object 'targets/logits/c/1/0' holds {size}"), seen
    assert "\n" not in seen["said"] and "FORMAT.md §13" in seen["said"] and "copy the store again" in seen["said"], seen
    assert seen["grew"] < 16 * 2**20, seen  # the object: 64 GiB


def test_a_shard_object_on_s3_larger_than_it_can_be_is_refused_unread(s3, tiny_store):
    """The same on object storage: a 64 MiB object where a shard of the array holds at most a few hundred bytes is
    refused by the size the GET answers with, its body unread (it was read whole, 64 MiB, into memory)."""
    from pathlib import Path

    import s3fs

    url, fs = f"s3://{BUCKET}/giant-shard.zarr", s3fs.S3FileSystem(**s3, skip_instance_cache=True)
    for f in Path(tiny_store).rglob("*"):
        if f.is_file():
            fs.pipe(f"{BUCKET}/giant-shard.zarr/{f.relative_to(tiny_store).as_posix()}", f.read_bytes())
    fs.pipe(f"{BUCKET}/giant-shard.zarr/targets/logits/c/1/0", bytes(64 * 2**20))
    seen = read_in_a_child(url, s3, "targets/logits", 1)
    assert seen["said"].startswith(f"DamagedStoreError: '{url}' is damaged: object 'targets/logits/c/1/0' holds {64 * 2**20:,} bytes, "
                                   "more than it can ("), seen
    assert seen["grew"] < 16 * 2**20, seen


def test_pack_of_an_s3_store_refuses_a_shard_whose_inner_chunk_fails_its_crc32c(s3, tiny_store, tmp_path):
    """pack read an object of S3 whole and copied it unchecked: a shard damaged in the bucket went into the zip. Its
    checksums are checked on the bytes read, as from a local folder."""
    from pathlib import Path

    import s3fs

    url, fs = f"s3://{BUCKET}/flipped.zarr", s3fs.S3FileSystem(**s3, skip_instance_cache=True)
    for f in Path(tiny_store).rglob("*"):
        if f.is_file():
            data = bytearray(f.read_bytes())
            if f.relative_to(tiny_store).as_posix() == "targets/logits/c/1/0":
                data[5] ^= 0x10  # inside inner chunk 0, the shard's only one
            fs.pipe(f"{BUCKET}/flipped.zarr/{f.relative_to(tiny_store).as_posix()}", bytes(data))
    with pytest.raises(StoreError, match=re.escape(f"cannot pack {url!r}: array 'targets/logits' shard 1 (object 'targets/logits/c/1/0') "
                                                   "inner chunk 0 (rows 16-31) fails its crc32c checksum")):
        pack(url, tmp_path / "t.zarr.zip", storage_options=s3)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command, key, fault", [
    ("info", "zarr.json", "giant"),  # the manifest, refused by its Content-Length
    ("info", "zarr.json", "lying"),  # read as far as 128 MiB, the most a zarr.json may hold
    ("verify", "targets/logits/c/1/0", "lying"),
    ("stats", "progress/done/c/1", "giant"),  # a done marker: a byte
    ("export", "targets/layers/features.3/c/2/0/0/0", "lying"),
    ("pack", "targets/logits/zarr.json", "giant"),
    ("train", "targets/logits/c/0/0", "giant"),
])
def test_every_command_refuses_an_object_a_server_sends_larger_than_it_can_be_in_one_line(faulty_http_root, tiny_store, tmp_path,
                                                                                          command, key, fault):
    """Through the command line, as test_safety's local objects larger than they can be: one line, exit 1, no traceback,
    nothing written, in at most 2 GiB of address space (the object: 64 GiB)."""
    import resource
    import shutil
    from pathlib import Path

    root, base = faulty_http_root
    name = f"{command}-{fault}.zarr"
    shutil.copytree(tiny_store, root / name, dirs_exist_ok=True)
    (root / ".faults").write_text(json.dumps({f"/{name}/{key}": fault}))
    url, fixtures = f"{base}/{name}", Path(__file__).parent / "fixtures"
    args = {"info": [url], "verify": [url], "stats": [url], "export": [url, str(tmp_path / "out.h5")],
            "pack": [url, str(tmp_path / "p.zarr.zip")], "train": [str(fixtures / "tiny.toml"), "--cache", url, "--out", str(tmp_path / "run")]}
    limit = lambda: resource.setrlimit(resource.RLIMIT_AS, (2 * 2**30, 2 * 2**30))  # noqa: E731
    try:
        r = subprocess.run([sys.executable, "-m", "kdcache", command, *args[command]], capture_output=True, text=True, cwd=fixtures,
                           preexec_fn=limit, timeout=300)
    finally:
        (root / ".faults").unlink()
    assert r.returncode == 1 and "Traceback" not in r.stderr and "MemoryError" not in r.stdout + r.stderr, (r.stdout, r.stderr)
    said = f"object '{key}' holds " + (f"{64 * 2**30:,} bytes, more than it can" if fault == "giant" else "more than")
    assert said in r.stdout + r.stderr and "FORMAT.md §13" in r.stdout + r.stderr, (r.stdout, r.stderr)
    if command != "verify":  # verify lists it among its checks' FAIL lines
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("Error: "), r.stderr
    assert not any(tmp_path.iterdir())


def test_a_writer_lock_object_a_server_sends_endlessly_is_refused_in_one_line(s3, keep_alive_s3, tiny_store, tmp_path):
    """The S3 writer lock object is read on every check of a lease and by every first look at a store (``pack`` keeps
    writers out with it): a server may send any number of bytes for it. Its body was read whole (2 GiB of address
    space: a MemoryError traceback); it is read as far as 64 KiB, the most a lock object holds, and refused in one line
    naming it, what it holds, the bound and the fix."""
    import resource

    import s3fs

    from reference import _dotted

    s3fs.S3FileSystem(**s3, skip_instance_cache=True).put(tiny_store, f"{BUCKET}/endless-lock.zarr", recursive=True)
    keep_alive_s3.endless.add(".endless-lock.zarr.kdcache-lock")
    options = {**s3, "endpoint_url": keep_alive_s3.url, "config_kwargs": {"retries": {"max_attempts": 0}}}
    limit = lambda: resource.setrlimit(resource.RLIMIT_AS, (2 * 2**30, 2 * 2**30))  # noqa: E731
    r = subprocess.run([sys.executable, "-m", "kdcache", "pack", f"s3://{BUCKET}/endless-lock.zarr", str(tmp_path / "p.zarr.zip"),
                        *(f"--storage-option={k}={v}" for k, v in _dotted(options))], capture_output=True, text=True, preexec_fn=limit,
                       timeout=300)
    lock = f"s3://{BUCKET}/.endless-lock.zarr.kdcache-lock"
    assert r.returncode == 1 and r.stderr == (
        f"Error: the writer lock object {lock!r} holds more than 65,536 bytes (the read stopped there); a lock object holds at most "
        f"65,536 bytes (kdcache's take a few hundred), so no kdcache job wrote it: once no job writes the store, delete it "
        f"(aws s3 rm {lock}) and rerun\n"), (r.stdout, r.stderr)
    assert list(tmp_path.iterdir()) == []


def pack_in_a_child(url: str, out, options: dict | None = None) -> subprocess.CompletedProcess:
    """``kdcache pack URL OUT`` in a child process with at most 2 GiB of address space: anything read whole of a 64 GiB
    answer is a MemoryError there."""
    import resource

    from reference import _dotted

    limit = lambda: resource.setrlimit(resource.RLIMIT_AS, (2 * 2**30, 2 * 2**30))  # noqa: E731
    return subprocess.run([sys.executable, "-m", "kdcache", "pack", url, str(out), *(f"--storage-option={k}={v}" for k, v in _dotted(options or {}))],
                          capture_output=True, text=True, preexec_fn=limit, timeout=300)


@pytest.mark.parametrize("encoding, chunk", [("default", "c/0"), ("v2", "0")])
def test_pack_refuses_a_chunk_of_a_foreign_array_a_server_sends_larger_than_it_can_be(faulty_http_root, tiny_store, tmp_path,
                                                                                      encoding, chunk):
    """An array someone added to the store with zarr (FORMAT.md §14) is packed with it, its chunk objects read whole
    from a server: they had no bound (64 GiB sent: a MemoryError traceback under 2 GiB). Its metadata bounds them
    (its 8 float32 values: 2 × 32 + 128 bytes), whatever its chunk key encoding, and the pack stops in one line."""
    import shutil

    import zarr

    root, base = faulty_http_root
    name = f"foreign-{encoding}.zarr"
    shutil.copytree(tiny_store, root / name, dirs_exist_ok=True)
    zarr.open_group(root / name, mode="r+").create_array("targets/extra", shape=(8,), chunks=(8,), dtype="float32",
                                                         chunk_key_encoding={"name": encoding})[:] = 1.0
    key = f"targets/extra/{chunk}"
    assert (root / name / key).is_file()
    (root / ".faults").write_text(json.dumps({f"/{name}/{key}": "lying"}))
    try:
        r = pack_in_a_child(f"{base}/{name}", tmp_path / "p.zarr.zip")
    finally:
        (root / ".faults").unlink()
    assert r.returncode == 1 and r.stderr.startswith(f"Error: '{base}/{name}' is damaged: object {key!r} holds more than 192 bytes, "
                                                     "the most it can (the read stopped there: FORMAT.md §13)"), (r.stdout, r.stderr)
    assert r.stderr.count("\n") == 1 and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fault", ["giant", "lying"])
def test_pack_refuses_an_http_index_page_a_server_sends_endlessly(faulty_http_root, tiny_store, tmp_path, fault):
    """pack lists an http(s) store through its folders' index pages (for the arrays someone added, and strays): fsspec's
    http read each page whole, so a server sending a 64 GiB page (with a Content-Length saying so, or none) ran the pack
    out of memory (a MemoryError traceback under 2 GiB). Each page is read as far as 256 MiB and refused in one line."""
    import shutil

    root, base = faulty_http_root
    name = f"listed-{fault}.zarr"
    shutil.copytree(tiny_store, root / name, dirs_exist_ok=True)
    (root / ".faults").write_text(json.dumps({"/": fault}))  # every folder's index page, and nothing else
    try:
        r = pack_in_a_child(f"{base}/{name}", tmp_path / "p.zarr.zip")
    finally:
        (root / ".faults").unlink()
    holds = f"{64 * 2**30:,} bytes" if fault == "giant" else f"more than {256 * 2**20:,} bytes (the read stopped there)"
    assert r.returncode == 1 and r.stderr == (
        f"Error: '{base}/{name}': the index page of its folder '/' holds {holds}, more than kdcache reads of one (268,435,456); it "
        "lists no store's objects: serve the store without index pages (kdcache reads the objects its layout names), or pack it "
        "where it is stored (kdcache pack FOLDER OUT) and serve the zip\n"), (r.stdout, r.stderr)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where", ["url", "local"])
def test_a_zip_whose_central_directory_claims_gigabytes_is_refused_unread(http_root, tmp_path, where):
    """zipfile reads a zip's central directory whole as it opens it, as long as its end record says: a zip of 3 GiB (a
    sparse file: 4 KB on disk, it survives a tarball; behind a URL a server may claim any size) whose end record gives
    its directory 3 GiB was read into memory (a MemoryError under 2 GiB). The end record alone is read, and the zip
    refused in one line."""
    import resource
    import struct

    root, base = http_root
    folder = root if where == "url" else tmp_path
    directory = 3 * 2**30
    with open(folder / "huge-directory.zarr.zip", "wb") as f:
        f.truncate(directory)  # a sparse file: nothing on disk
        f.seek(directory)
        f.write(struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 1, 1, directory, 0, 0))  # the end record: 1 member, 3 GiB of directory at 0
    url = f"zip::{base}/huge-directory.zarr.zip" if where == "url" else str(folder / "huge-directory.zarr.zip")
    limit = lambda: resource.setrlimit(resource.RLIMIT_AS, (2 * 2**30, 2 * 2**30))  # noqa: E731
    try:
        r = subprocess.run([sys.executable, "-m", "kdcache", "info", url], capture_output=True, text=True, preexec_fn=limit, timeout=300)
    finally:
        (folder / "huge-directory.zarr.zip").unlink()
    assert r.returncode == 1 and r.stderr == (
        f"Error: {url!r} is damaged: its zip's central directory holds {directory:,} bytes (its end record says), more than kdcache "
        "reads of one (268,435,456: about 2.5 million members of a store), and is not read; copy the zip again from its source "
        "(kdcache pack FOLDER OUT writes one)\n"), (r.stdout, r.stderr)


@pytest.fixture
def counted_http_root(tmp_path):
    """``(folder, base_url, log)``: ``folder`` served by RangeHTTPServer's handler in a thread on 127.0.0.1, ``log`` each
    request it answered as ``(method, path, Range header or None)``."""

    handler = pytest.importorskip("RangeHTTPServer").RangeRequestHandler
    log: list[tuple[str, str, str | None]] = []

    class Counted(handler):  # type: ignore[misc, valid-type]
        def log_message(self, *args: object) -> None:
            pass

        def send_head(self):  # type: ignore[no-untyped-def]
            log.append((self.command, self.path, self.headers.get("Range")))
            return super().send_head()

    with _serving_in_a_thread(Counted, tmp_path) as base:
        yield tmp_path, base, log


def test_opening_a_zip_over_http_reads_its_central_directory_once(counted_http_root, tiny_store):
    """open_store looked for the root zarr.json through one zarr Store of the chain and read the store through
    another: the zip was opened twice, its end record checked twice (check_zip_directory) and its central directory read
    twice, 18 requests to open a zip over http where 11 do. Its end record is read by the check and by zipfile, once
    each, its central directory once."""
    import zipfile

    root, base, log = counted_http_root
    pack(tiny_store, root / "t.zarr.zip")
    with zipfile.ZipFile(root / "t.zarr.zip") as z:
        start, size = z.start_dir, (root / "t.zarr.zip").stat().st_size
    store = open_store(f"zip::{base}/t.zarr.zip")
    assert store.num_samples == 50
    ranges = [r for method, path, r in log if method == "GET" and path == "/t.zarr.zip"]
    assert sum(r.endswith(f"-{size - 1}") for r in ranges) == 2, log  # the end record: the check's read, zipfile's
    assert sum(r.startswith(f"bytes={start}-") for r in ranges) == 1, log  # the central directory
    assert len(log) <= 11, log


@pytest.mark.parametrize("budget", [2048, 0], ids=["memory", "stream"])
def test_train_from_an_http_store_reads_its_metadata_and_markers_once(counted_http_root, tiny_store, tmp_path, budget):
    """train opened its store for its setup checks, then its reader (TransferSet) opened it again, and a streaming
    reader a third time at its first read: each opening read the root's and the groups' zarr.json, the arrays' metadata
    and every done marker again, 53 requests over http for a store of 4 shards x 5 arrays where 43 do (69 streaming, where
    44 do). The reader is handed the Store setup opened and looks at the root's zarr.json once more, to refuse a store
    replaced since (test_alignment's test of it), and a streaming reader once again at its first read. The opening reads
    the root's zarr.json once (its first look's bytes are what zarr parses: it read them twice, 41 / 42 requests where 43
    / 44 were), and the digest array's once (has_digests' bytes are the array's metadata)."""
    import collections
    import shutil

    root, base, log = counted_http_root
    shutil.copytree(tiny_store, root / "t.zarr")
    kdcache.train(kdcache.load_pipeline(TINY_TOML, ["train.epochs=1", f"train.memory_budget_mb={budget}"]), f"{base}/t.zarr", tmp_path / "run")
    gets = collections.Counter(path.removeprefix("/t.zarr/") for method, path, _ in log if method == "GET")
    assert sum(gets.values()) == len(log), log  # no HEAD, no listing
    # the root: the opening's first look at the endpoint (its bytes parsed), the reader's look, a streaming reader's at its first read
    assert gets.pop("zarr.json") == (2 if budget else 3), log
    # every other metadata object and marker once: has_digests' read of the digest array's zarr.json opens the array
    assert {key: n for key, n in gets.items() if n != 1} == {}, log
    assert sum(key.startswith("progress/done/c/") for key in gets) == 4 and sum("/c/" in key for key in gets) == 4 + 4 + 4 * 5, log
    assert len(log) <= (41 if budget else 42), log


def test_a_reader_handed_an_opened_zip_over_http_refuses_one_put_at_its_url_since(counted_http_root, numbered_store, tmp_path):
    """A zip behind a URL (zip::https://…) is read through the directory its Store read when it was opened, from the bytes
    its filesystem cached then: a reader handed that Store looked at the store's manifest so, and a zip put at the URL
    since (another kdcache pack, uploaded over it) was not refused, where the reader opening the location (before it was
    handed the Store) refused it. The zip at the URL is opened again for that look: refused as replaced, before the reader
    is made or at its first streaming read, and one removed since as removed."""
    import os
    import shutil

    from kdcache.cache import TransferSet
    from kdcache.errors import StoreReplacedError
    from numbered import Numbered

    root, base, _ = counted_http_root
    folder = tmp_path / "s.zarr"
    shutil.copytree(numbered_store, folder)
    pack(str(folder), str(tmp_path / "first.zip"))
    meta = json.loads((folder / "zarr.json").read_text())
    meta["attributes"]["kdcache"]["created"] = "2030-01-02T00:00:00+00:00"
    (folder / "zarr.json").write_text(json.dumps(meta))
    pack(str(folder), str(tmp_path / "second.zip"))
    location = f"zip::{base}/t.zarr.zip"

    def reader(store, **kwargs):
        return TransferSet(store, Numbered(), ["logits"], batch_size=16, memory_budget_mb=0, **kwargs)

    def put(name: str) -> None:
        shutil.copy(tmp_path / name, root / "t.part")
        os.replace(root / "t.part", root / "t.zarr.zip")

    put("first.zip")
    opened = open_store(location)
    put("second.zip")
    with pytest.raises(StoreReplacedError, match=r"t\.zarr\.zip' was replaced between its first opening and this reader's: its "
                       r"manifest's created was '[^']+' when first opened and is '2030-01-02T00:00:00\+00:00' now"):
        reader(opened)
    put("first.zip")
    ts = reader(open_store(location))
    put("second.zip")
    ts.set_epoch(0)
    with pytest.raises(StoreReplacedError, match=r"t\.zarr\.zip' was replaced while this reader used it: its manifest's created "
                       r"was '[^']+' when the reader was made and is '2030-01-02T00:00:00\+00:00' now"):
        list(ts)
    ts = reader(open_store(location))
    os.remove(root / "t.zarr.zip")
    ts.set_epoch(0)
    with pytest.raises(StoreReplacedError, match=r"t\.zarr\.zip' was removed or replaced while this reader used it: no store manifest"):
        list(ts)


@pytest.mark.parametrize("command", ["stats", "export"])
def test_stats_and_export_of_an_http_store_read_its_done_markers_once_for_their_checks(counted_http_root, tiny_store, tmp_path, command):
    """stats and export read every done marker (one object a shard) to choose or check the shards, then again as their
    first read took the markers its rows are checked against; stats' blocks, reading at once, each read the metadata of
    an array no block had opened yet (36 to 38 requests over http for a store of 4 shards, where 32 do; export 54, where
    50 do). The markers are read once for both, each array's metadata once. Export copied the markers and digest rows
    into its file with reads of their own, and the root's and the digest array's zarr.json were each read twice by every
    command (the opening's look and zarr's read; has_digests and zarr's): 30 requests for stats, 40 for export. Stats 32
    since the opening asks for every array's zarr.json at once (samples/index and samples/fingerprint, which stats does
    not read, too: two requests more, in a round trip waited anyway, where 6 were waited one after another)."""
    import collections
    import shutil

    from kdcache.interop import export_hdf5
    from kdcache.stats import stats

    root, base, log = counted_http_root
    shutil.copytree(tiny_store, root / "t.zarr")
    if command == "stats":
        stats(f"{base}/t.zarr")
    else:
        export_hdf5(f"{base}/t.zarr", tmp_path / "t.h5")
    gets = collections.Counter(path.removeprefix("/t.zarr/") for method, path, _ in log if method == "GET")
    assert sum(gets.values()) == len(log), log
    markers = [n for key, n in gets.items() if key.startswith("progress/done/c/")]
    assert markers == [1] * 4, log  # export's file holds the markers its reads checked rows against
    assert [n for key, n in gets.items() if key.startswith("progress/digest/c/")] == [1] * 4, log  # and the digests
    assert {key: n for key, n in gets.items() if key.endswith("zarr.json") and n != 1} == {}, log
    assert len(log) <= (32 if command == "stats" else 40), log


def test_verify_of_an_http_store_reads_each_done_marker_and_metadata_object_once(counted_http_root, tiny_store):
    """verify read every done marker 4 times (its open check, completeness, the checksums' choice of shards and the first
    read's snapshot), each digest row twice (the layout check's, the snapshot's), the root's and the digest array's
    zarr.json twice each: 70 requests over http for a store of 4 shards, where 52 do. The markers and digest rows are
    read once, for every check and the reads; each metadata object once."""
    import collections
    import shutil

    root, base, log = counted_http_root
    shutil.copytree(tiny_store, root / "t.zarr")
    report = verify(f"{base}/t.zarr")
    assert report["ok"], report
    gets = collections.Counter(path.removeprefix("/t.zarr/") for method, path, _ in log if method == "GET" and not path.endswith("/"))
    assert [n for key, n in gets.items() if key.startswith("progress/done/c/")] == [1] * 4, log
    assert [n for key, n in gets.items() if key.startswith("progress/digest/c/")] == [1] * 4, log
    assert {key: n for key, n in gets.items() if key.endswith("zarr.json") and n != 1} == {}, log
    assert len(log) <= 52, log


def test_pack_of_an_http_store_reads_each_done_marker_and_digest_row_once_for_its_checks(counted_http_root, tiny_store, tmp_path):
    """pack read every done marker four times (its completeness check, the missing-object check's and the digest check's
    choice of shards, the copy) and each digest row more than twice (its digest check, the layout check, the copy): each
    is read once for the checks, and once more as the object copied into the zip."""
    import collections
    import shutil

    root, base, log = counted_http_root
    shutil.copytree(tiny_store, root / "p.zarr")
    result = pack(f"{base}/p.zarr", tmp_path / "p.zarr.zip")
    assert result["left_out"] == [] and verify(str(tmp_path / "p.zarr.zip"))["ok"]
    gets = collections.Counter(path.removeprefix("/p.zarr/") for method, path, _ in log if method == "GET" and not path.endswith("/"))
    assert [n for key, n in sorted(gets.items()) if key.startswith("progress/done/c/")] == [2] * 4, log
    assert [n for key, n in sorted(gets.items()) if key.startswith("progress/digest/c/")] == [2] * 4, log


def test_opening_an_s3_store_reads_its_root_zarr_json_in_one_get(s3, keep_alive_s3, tiny_store):
    """Every opening of an S3 store looked for its root zarr.json (a HEAD: the first look at the endpoint, then s3fs's
    exists) and zarr read it (a GET): two round trips where one does. The look is the GET, its bytes what zarr parses, at
    the first look and at a later opening alike; has_digests' read of the digest array's zarr.json is the array's metadata."""
    import collections

    import s3fs

    from kdcache.store import LOGITS

    s3fs.S3FileSystem(**s3, skip_instance_cache=True).put(tiny_store, f"{BUCKET}/once.zarr", recursive=True)
    options = {**s3, "endpoint_url": keep_alive_s3.url}  # a new endpoint: the first look at it
    seen = keep_alive_s3.requests
    for opening in ("first look", "later look"):
        before = len(seen)
        store = open_store(f"s3://{BUCKET}/once.zarr", storage_options=options)
        assert store.read(LOGITS, 0, 16).shape == (16, 4)  # the done markers and digest rows, the rows: each once
        asked = collections.Counter((method, path.split("?")[0].removeprefix(f"/{BUCKET}/once.zarr/")) for method, path in seen[before:])
        assert asked[("HEAD", "zarr.json")] == 0 and asked[("GET", "zarr.json")] == 1, (opening, asked)
        assert asked[("GET", "progress/digest/zarr.json")] == 1, (opening, asked)
        assert not [k for k, n in asked.items() if n != 1], (opening, asked)


def test_a_zarr_without_the_private_parsers_opens_an_s3_store_by_reading_its_metadata_again(s3, keep_alive_s3, tiny_store, monkeypatch):
    """The bytes of the root's and the digest array's zarr.json, read once, are parsed by private parts of zarr 3.1
    (store._zarr_private finds them); a zarr release (kdcache takes any 3.x) that moves one must cost a request, not
    the opening of every remote store: where they are not found the store opens, reads and verifies as before, zarr
    reading that metadata again."""
    import collections

    import s3fs

    from kdcache import store as layout
    from kdcache.store import LOGITS

    assert layout._zarr_private("zarr.core.group", "AsyncGroup._from_bytes_v3", "_build_node") is not None  # zarr 3.1's
    assert layout._zarr_private("zarr.core.group", "AsyncGroup._from_bytes_v4") is None  # a name moved
    assert layout._zarr_private("zarr.storage._moved", "make_store_path") is None  # a module moved
    monkeypatch.setattr(layout, "_zarr_private", lambda module, *names: None)  # this zarr has moved them
    s3fs.S3FileSystem(**s3, skip_instance_cache=True).put(tiny_store, f"{BUCKET}/moved.zarr", recursive=True)
    seen = keep_alive_s3.requests
    before = len(seen)
    store = open_store(f"s3://{BUCKET}/moved.zarr", storage_options={**s3, "endpoint_url": keep_alive_s3.url})
    assert store.read(LOGITS, 0, 16).shape == (16, 4) and store.has_digests()
    asked = collections.Counter((m, path.split("?")[0].removeprefix(f"/{BUCKET}/moved.zarr/")) for m, path in seen[before:])
    assert asked[("GET", "zarr.json")] == 2 and asked[("GET", "progress/digest/zarr.json")] == 2, asked  # read again by zarr
    assert verify(f"s3://{BUCKET}/moved.zarr", storage_options={**s3, "endpoint_url": keep_alive_s3.url})["ok"]


def test_verify_of_a_bucket_that_refuses_listing_checks_the_store_and_says_added_arrays_were_not_looked_for(s3, keep_alive_s3, tiny_store):
    """verify finds arrays added to a store by listing it (as pack does); a bucket that grants GetObject alone answers
    that listing 403. The store's own arrays are still checked, and the summary says added arrays were not looked for."""
    import s3fs

    s3fs.S3FileSystem(**s3, skip_instance_cache=True).put(tiny_store, f"{BUCKET}/unlisted.zarr", recursive=True)
    keep_alive_s3.faults["list-type"] = 403  # ListObjectsV2: GET /BUCKET?list-type=2&...
    report = verify(f"s3://{BUCKET}/unlisted.zarr", storage_options={**s3, "endpoint_url": keep_alive_s3.url})
    assert report["ok"], report
    assert report["checks"][2]["summary"] == "4 shards x 5 arrays; added arrays not looked for (listing the location was refused)", report


# ------------------------------------------------------------------ http(s) stores: names, index pages, redirects


@pytest.fixture(scope="module")
def odd_store(tmp_path_factory):
    """tiny.toml extracted from ``tiny.py:odd_names``, whose two layer targets (``features.blöck 3%2F~`` and its ``.3``)
    are stored under FORMAT.md §6's encoding: ``targets/layers/features.bl%C3%B6ck%203%252F%7E`` (a ``%`` in the path)."""
    from conftest import extract_tiny
    from tiny import ODD_NAME

    layers = json.dumps([f"features.{ODD_NAME}", f"features.{ODD_NAME}.3"])
    return extract_tiny(tmp_path_factory.mktemp("odd") / "odd.zarr", "teacher.factory=tiny.py:odd_names", f"targets.layers={layers}")


@pytest.mark.parametrize("served", ["plain_http_root", "http_root"])
def test_a_store_whose_paths_need_percent_encoding_reads_over_http_as_it_does_locally(served, odd_store, tmp_path, request):
    """A store's keys hold ``%`` (a layer's encoded name, FORMAT.md §6), and a server's index pages percent-encode every
    name they link (``bl%25C3%25B6ck%25203%25252F%257E/``): each object's URL encodes its key, and each link is decoded
    to the key it names. Both were taken as they were: the layer's array was "missing" (the server decoded
    ``%252F`` to ``%2F`` and found no such folder), and the listing gave the links' encoded names as keys. Served
    from a folder whose own name needs encoding too (``my store 100%``), with and without Range support."""
    import shutil

    root, base = request.getfixturevalue(served)
    shutil.copytree(odd_store, root / "my store 100%" / "odd.zarr", dirs_exist_ok=True)
    local = open_store(odd_store)
    assert "targets/layers/features.bl%C3%B6ck%203%252F%7E.3" in local.paths()
    pack(odd_store, tmp_path / "local.zarr.zip")
    for i, url in enumerate((f"{base}/my%20store%20100%25/odd.zarr", f"{base}/my store 100%25/odd.zarr/")):
        assert open_store(url).object_keys() == local.object_keys(), url
        assert_same_store(url, odd_store)
        assert verify(url)["ok"], url
        pack(url, tmp_path / f"{i}.zarr.zip")
        assert (tmp_path / f"{i}.zarr.zip").read_bytes() == (tmp_path / "local.zarr.zip").read_bytes(), url


class LoggedHTTP:
    """A static HTTP server on 127.0.0.1, in this process: ``root`` served as ``python -m http.server`` serves it (a
    folder's ``index.html`` is its index page), except for a path ``pages(path)`` answers (a page's HTML, not None), and
    a path under a key of ``moved`` (301 to the value in its place). Each request is logged: ``(Host header, path)``;
    past ``MAX_REQUESTS`` every one is a 404, so that a walk that does not end does, and its test fails instead."""

    MAX_REQUESTS = 2000

    def __init__(self, root, pages=None, moved: dict[str, str] | None = None):
        import functools
        import http.server
        import threading

        self.log: list[tuple[str, str]] = []
        outer = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                outer.log.append((self.headers.get("Host"), self.path))
                old = next((old for old in moved or {} if self.path.startswith(old)), None)
                if len(outer.log) > outer.MAX_REQUESTS:
                    self.send_error(404)
                elif old is not None:
                    self.send_response(301)
                    self.send_header("Location", moved[old] + self.path[len(old):])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif pages is not None and (page := pages(self.path)) is not None:
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(page.encode())))
                    self.end_headers()
                    self.wfile.write(page.encode())
                else:
                    super().do_GET()

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextlib.contextmanager
def logged_http(root, pages=None, moved=None):
    server = LoggedHTTP(root, pages, moved)
    try:
        yield server
    finally:
        server.close()


def write_index_pages(folder, url_path: str, style: str, port: int) -> None:
    """An ``index.html`` in ``folder`` and each folder below it (served at ``url_path``), as Apache's or nginx's
    ``autoindex`` writes one: every entry percent-encoded, and links that lead nowhere new. Apache's parent and sort
    links (``/PARENT/``, ``?C=N;O=D``), nginx's ``../``; the folder itself as ``./``, ``.//``, its full and
    protocol-relative URLs, with ``/./``; its subfolders again as ``./NAME/`` and by full URL; ``%2E%2E/``, the server's
    root, a sibling store's object, another host, ``https://``, a fragment, a query, ``mailto:``."""
    from urllib.parse import quote

    entries = sorted(p.name + "/" * p.is_dir() for p in folder.iterdir() if p.name != "index.html")
    here, server = quote(url_path), f"127.0.0.1:{port}"
    links = [quote(e) for e in entries] + [f"./{quote(e)}" for e in entries if e.endswith("/")]
    links += [f"http://{server}{here}{quote(e)}" for e in entries if e.endswith("/")]
    links += ["./", ".//", f"http://{server}{here}", f"//{server}{here}./", "%2E%2E/", "/", "/sibling.zarr/zarr.json",
              f"http://localhost:{port}{here}", f"https://{server}{here}", "#top", "zarr.json?download=1", "mailto:a@b.c"]
    if style == "apache":
        links += ["?C=N;O=D", "?C=M&amp;O=A", quote(url_path.rstrip("/").rpartition("/")[0] + "/")]
    else:
        links += ["../"]
    (folder / "index.html").write_text("<html><body><pre>\n" + "".join(f'<a href="{link}">{link}</a>\n' for link in links) + "</pre></body></html>\n")
    for sub in folder.iterdir():
        if sub.is_dir():
            write_index_pages(sub, f"{url_path}{sub.name}/", style, port)


@pytest.mark.parametrize("style", ["apache", "nginx"])
def test_an_http_store_is_listed_through_index_pages_that_link_anywhere_each_folder_once(style, odd_store, tmp_path):
    """kdcache walks an http store's index pages itself: a link is resolved as a browser would and followed only where
    it leads below the folder whose page it is on, and each folder is asked for once, however many spellings link to
    it. Before, ``?C=N;O=D`` (Apache's sort links) was listed as an object, ``./NAME/`` and full URLs listed a folder
    again under each spelling (a page linking to its folder twice so doubled the requests at each level, 2^32 at
    MAX_LISTING_DEPTH), ``%2E%2E/`` left the store, and ``https://`` links to the same host were followed as ``http``."""
    import shutil

    local = open_store(odd_store)
    pack(odd_store, tmp_path / "local.zarr.zip")
    with logged_http(tmp_path / "www") as server:
        shutil.copytree(odd_store, tmp_path / "www/t.zarr")
        shutil.copytree(odd_store, tmp_path / "www/sibling.zarr")
        write_index_pages(tmp_path / "www", "/", style, server.port)
        url = f"{server.url}/t.zarr"
        assert open_store(url).object_keys() == local.object_keys()
        pages = [path for _, path in server.log if path.endswith("/")]
        assert sorted(pages) == sorted(set(pages)) and len(pages) == 1 + len(local_folders(odd_store)), pages
        assert {host for host, _ in server.log} == {f"127.0.0.1:{server.port}"}
        assert all(path.startswith("/t.zarr/") for _, path in server.log), server.log
        pack(url, tmp_path / "http.zarr.zip")
    assert (tmp_path / "http.zarr.zip").read_bytes() == (tmp_path / "local.zarr.zip").read_bytes()


def test_an_index_pages_full_url_links_name_the_stores_server_as_a_redirect_does():
    """A page's full-URL links are followed where they lead to the store's server however it is written: the scheme's
    port written or not (``http://host/`` is ``http://HOST:80/``), as a redirect is judged (storage._server); before,
    the netloc was compared as written and a store given as ``http://host:80/t.zarr`` listed none of them. A link that
    is no URL (``http://[bad``) is none (was: urlsplit's ValueError, a traceback)."""
    from kdcache.storage import _links

    page = "".join(f'<a href="{link}">x</a>' for link in ("http://host/t.zarr/a/", "http://HOST:80/t.zarr/b", "https://host/t.zarr/c",
                                                          "http://host:8080/t.zarr/d", "http://other/t.zarr/e", "http://[bad",
                                                          "http://host:x/t.zarr/f"))
    for store in ("http://host/t.zarr/", "http://host:80/t.zarr/", "HTTP://Host/t.zarr/"):
        assert _links(page, store, False) == {"a/", "b"}, store


def local_folders(store: str) -> list:
    from pathlib import Path

    return [p for p in Path(store).rglob("*") if p.is_dir()]


@pytest.mark.parametrize("links, said", [
    (["a/", "b/", "./", "../"], "the index pages below its folder '/' link to more than 100 folders"),
    (["a/", "./a/", "../a/"], None),  # one folder a level, ever deeper: the walk stops MAX_LISTING_DEPTH below the store
])
def test_index_pages_that_link_folders_without_end_are_walked_in_bounded_requests(links, said, tiny_store, tmp_path, monkeypatch):
    """A server whose every folder page links new folders below it (a generated tree, a loop through a symlink) is
    walked in at most two requests a folder, at most MAX_LISTING_FOLDERS folders (then refused in one line) and
    MAX_LISTING_DEPTH deep. Before, a page linking two folders doubled the requests at each level, to 2^32."""
    import shutil

    from kdcache import storage

    monkeypatch.setattr(storage, "MAX_LISTING_FOLDERS", 100)
    shutil.copytree(tiny_store, tmp_path / "t.zarr")
    page = "".join(f'<a href="{link}">{link}</a>' for link in links)
    with logged_http(tmp_path, pages=lambda path: page if path.endswith("/") else None) as server:
        url = f"{server.url}/t.zarr"
        r = CliRunner().invoke(main, ["pack", url, str(tmp_path / "out.zarr.zip")])
        folders = [path for _, path in server.log if path.endswith("/")]
    if said:
        assert r.exit_code == 1 and r.output.startswith(f"Error: '{url}': {said}"), r.output
        assert len(r.output.strip().splitlines()) == 1 and len(folders) <= 101, (r.output, len(folders))
    else:
        assert r.exit_code == 0, r.output
        assert len(folders) == 1 + storage.MAX_LISTING_DEPTH and max(folders) == "/t.zarr/" + "a/" * storage.MAX_LISTING_DEPTH


@pytest.mark.parametrize("location, fixed", [
    ("HTTP://127.0.0.1:9/t.zarr", "http://127.0.0.1:9/t.zarr"),
    ("Https://127.0.0.1:9/t.zarr", "https://127.0.0.1:9/t.zarr"),
    ("S3://bucket/t.zarr", "s3://bucket/t.zarr"),
    ("zip::HTTP://127.0.0.1:9/t.zarr.zip", "zip::http://127.0.0.1:9/t.zarr.zip"),
    ("ZIP::https://127.0.0.1:9/t.zarr.zip", "zip::https://127.0.0.1:9/t.zarr.zip"),
])
def test_a_url_whose_scheme_is_not_in_lower_case_is_refused_naming_the_url_to_pass(location, fixed, tiny_store, tmp_path, monkeypatch):
    """fsspec knows schemes in lower case alone: ``HTTP://host/t.zarr`` was "cannot reach …: Protocol not known: HTTP;
    check the URL, --storage-option values and credentials". It is refused before any request, naming the URL to pass,
    by every command, and never written as a local folder (``S3:``); ``HTTP:/host/t.zarr`` (a slash lost) is told the
    lower-case URL too."""
    monkeypatch.chdir(tmp_path)
    said = f"Error: {location!r}: a URL's scheme is written in lower case for fsspec, which knows no "
    commands = [["info", location], ["verify", location], ["pack", location, "out.zarr.zip"],
                ["train", str(TINY_TOML), "--cache", location, "--out", "run"]]
    commands += [] if "zip" in location.lower() else [["extract", str(TINY_TOML), "--out", location]]
    for args in commands:
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 1 and r.output.startswith(said) and r.output.endswith(f"; pass {fixed!r}\n"), (args, r.output)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    collapsed = location.replace("://", ":/")
    if "::" not in location:
        r = CliRunner().invoke(main, ["info", collapsed])
        assert r.exit_code == 1 and r.output.endswith(f"; pass {fixed!r}\n"), r.output


def test_an_http_store_is_read_through_redirects_on_its_server_and_refuses_them_to_another(odd_store, tmp_path):
    """A redirect on the store's own server (a store moved: 301 to ``/t.zarr/…``) is followed: the store reads, verifies
    and packs as it does locally. One to another server (scheme, host or port: here ``localhost`` for ``127.0.0.1``) is
    refused before anything is asked of it, naming the URL to pass if that server is trusted: its objects would come
    from a server the user did not name, with the headers given (aiohttp drops only ``Authorization``; here
    ``X-Token``). Before, it was followed for every object. A redirect loop and one to ``file://`` are one line each
    (the loop was "no store at … (HTTP 0)")."""
    import shutil

    shutil.copytree(odd_store, tmp_path / "www/t.zarr")
    pack(odd_store, tmp_path / "local.zarr.zip")
    moved = {"/moved.zarr/": "/t.zarr/", "/loop.zarr/": "/loop.zarr/", "/etc.zarr/": "file:///etc/"}
    with logged_http(tmp_path / "www", moved=moved) as server:
        moved["/away.zarr/"] = f"http://localhost:{server.port}/t.zarr/"
        assert_same_store(f"{server.url}/moved.zarr", odd_store)
        assert verify(f"{server.url}/moved.zarr")["ok"]
        pack(f"{server.url}/moved.zarr", tmp_path / "moved.zarr.zip")
        assert (tmp_path / "moved.zarr.zip").read_bytes() == (tmp_path / "local.zarr.zip").read_bytes()
        url, there = f"{server.url}/away.zarr", f"http://localhost:{server.port}/t.zarr"
        server.log.clear()
        for args in (["info", url, "--storage-option", "headers.X-Token=secret"], ["verify", url], ["pack", url, str(tmp_path / "a.zip")],
                     ["train", str(TINY_TOML), "--cache", url, "--out", str(tmp_path / "run")]):
            r = CliRunner().invoke(main, args)
            assert r.exit_code == 1 and r.output == (
                f"Error: '{url}/zarr.json' redirects to '{there}/zarr.json', on another server: kdcache follows redirects on the "
                f"store's server alone; pass the URL it is at there, '{there}', if you trust that server\n"), (args, r.output)
        assert {host for host, _ in server.log} == {f"127.0.0.1:{server.port}"}, server.log
        for name, said in (("loop", f"'{server.url}/loop.zarr/zarr.json' redirects more than 10 times"),
                           ("etc", f"'{server.url}/etc.zarr/zarr.json' redirects to 'file:///etc/zarr.json', on another server")):
            r = CliRunner().invoke(main, ["info", f"{server.url}/{name}.zarr"])
            assert r.exit_code == 1 and r.output.startswith(f"Error: {said}") and len(r.output.splitlines()) == 1, r.output


@pytest.mark.parametrize("to", ["http://localhost:{port}", "https://127.0.0.1:{port}"])
def test_a_redirect_of_a_store_to_the_same_path_on_another_server_names_the_store_url_there(to, tiny_store, tmp_path):
    """The most common redirects keep the store's path: another host for the same ``/t.zarr/…``, ``http://`` →
    ``https://``. The error names the store's URL there by the key the redirect kept (``zarr.json``), and that URL
    opens. Before, it was found as the segments the two URLs end in alike, the store's own folder and host among them:
    ``pass the URL it is at there, 'http://localhost:PORT'`` (no store there), or ``'https:'`` for ``http://`` →
    ``https://``."""
    import shutil

    shutil.copytree(tiny_store, tmp_path / "www/t.zarr")
    moved: dict[str, str] = {}
    with logged_http(tmp_path / "www", moved=moved) as server:
        there = to.format(port=server.port) + "/t.zarr"
        moved["/t.zarr/"] = there + "/"
        for url in (f"{server.url}/t.zarr", f"{server.url}/t.zarr/"):
            r = CliRunner().invoke(main, ["info", url])
            assert r.exit_code == 1 and r.output == (
                f"Error: '{server.url}/t.zarr/zarr.json' redirects to '{there}/zarr.json', on another server: kdcache follows "
                f"redirects on the store's server alone; pass the URL it is at there, '{there}', if you trust that server\n"), r.output
        if there.startswith("http://"):
            moved.clear()
            assert CliRunner().invoke(main, ["info", there]).exit_code == 0


def test_a_redirect_to_the_stores_server_spelled_otherwise_is_followed(tiny_store, tmp_path):
    """A server's ``Location`` spells its host as it will (``localhost`` for the ``LocalHost`` a user typed: a host name
    has no case) and may leave out the scheme's own port: the same server, followed. Before, the host was compared as
    written, and the redirect refused as one to another server."""
    import shutil

    shutil.copytree(tiny_store, tmp_path / "www/t.zarr")
    moved: dict[str, str] = {}
    with logged_http(tmp_path / "www", moved=moved) as server:
        moved["/moved.zarr/"] = f"http://localhost:{server.port}/t.zarr/"
        assert_same_store(f"http://LocalHost:{server.port}/moved.zarr", tiny_store)


def test_verify_over_http_lists_no_chunk_folder_of_kdcaches_arrays_and_finds_an_added_arrays_damage(counted_http_root, tiny_store):
    """verify lists a store to find the arrays added to it; over http each folder is an index page, and each shard of a
    2-d array is a folder (c/S/0): its listing cost a page per shard of each array, as many requests as its checks. It
    does not walk kdcache's arrays' chunk folders (an added array cannot be inside an array), and finds the added one."""
    import shutil

    import zarr

    root, base, log = counted_http_root
    shutil.copytree(tiny_store, root / "t.zarr")
    group = zarr.open_group(root / "t.zarr", mode="r+")
    group.create_array("extra/checked", shape=(8, 6), shards=(4, 6), chunks=(2, 3), dtype="int32",
                       compressors=[zarr.codecs.Crc32cCodec()])[:] = 7
    shard = root / "t.zarr/extra/checked/c/1/0"
    data = bytearray(shard.read_bytes())
    data[3] ^= 0xFF
    shard.write_bytes(bytes(data))
    report = verify(f"{base}/t.zarr")
    assert [p for c in report["checks"] for p in c["problems"]] == [
        "array 'extra/checked' shard 1 (object 'extra/checked/c/1/0') inner chunk 0 fails its crc32c checksum"], report
    pages = {path for method, path, _ in log if method == "GET" and path.endswith("/")}
    assert "/t.zarr/extra/checked/c/" in pages and not [p for p in pages if "/c/" in p and "/extra/" not in p], sorted(pages)


def test_an_http_stores_index_pages_are_asked_for_several_at_once(tmp_path, tiny_store):
    """pack (and verify) list an http store through its index pages: one at a time, a store of 2,000 shards (~10,000
    folders) took 10,000 round trips in a row; up to storage.LISTING_PAGES_AT_ONCE are asked for at once."""
    import shutil
    import threading

    handler = pytest.importorskip("RangeHTTPServer").RangeRequestHandler
    state = {"now": 0, "most": 0}
    lock = threading.Lock()

    class Slow(handler):  # type: ignore[misc, valid-type]
        def log_message(self, *args: object) -> None:
            pass

        def send_head(self):  # type: ignore[no-untyped-def]
            if not self.path.endswith("/"):
                return super().send_head()
            with lock:
                state["now"] += 1
                state["most"] = max(state["most"], state["now"])
            time.sleep(0.02)  # an index page's round trip
            with lock:
                state["now"] -= 1
            return super().send_head()

    shutil.copytree(tiny_store, tmp_path / "t.zarr")
    with _serving_in_a_thread(Slow, tmp_path) as base:
        pack(f"{base}/t.zarr", tmp_path / "h.zarr.zip")
    pack(str(tmp_path / "t.zarr"), tmp_path / "l.zarr.zip")
    assert (tmp_path / "h.zarr.zip").read_bytes() == (tmp_path / "l.zarr.zip").read_bytes()
    assert state["most"] > 1, state


@pytest.mark.parametrize("layer", ["simplecache", "filecache", "blockcache"])
@pytest.mark.parametrize("command", [["info"], ["verify"], ["stats"], ["train", str(TINY_TOML), "--out", "run", "--cache"]])
def test_a_caching_layer_over_a_store_folder_is_refused_in_one_line_naming_the_zip_form_that_works(layer, command, tmp_path, monkeypatch):
    """fsspec's caching layers (``simplecache::https://host/t.zarr``) run their requests outside zarr's event loop: every
    command failed with "cannot reach …: Timeout context manager should be used inside a task; check the URL …" over
    http, and info with a traceback over s3. Refused before any request, naming the URL without it and the packed zip's
    form (``zip::simplecache::…``, the file cached whole), which works."""
    monkeypatch.chdir(tmp_path)
    url = f"{layer}::http://127.0.0.1:9/t.zarr"  # nothing listens there: no request is made
    r = CliRunner().invoke(main, [*command, url])
    assert r.exit_code == 1, r.output
    assert r.output == (f"Error: {url!r}: fsspec's caching layer {layer}:: cannot serve a store folder (its requests run outside "
                        "zarr's event loop); pass the folder's URL without it, 'http://127.0.0.1:9/t.zarr', or pack the store and "
                        f"read the zip through it, {layer}:: after zip:: ('zip::{layer}::https://…/STORE.zarr.zip': the file cached whole)\n")


@pytest.mark.parametrize("given", ["simplecache::{base}/c.zarr.zip", "simplecache::zip::{base}/c.zarr.zip"], ids=["no-zip", "zip-after"])
def test_a_caching_layer_before_a_zips_url_is_refused_naming_the_order_that_reads_it(given, http_root, tiny_store):
    """A caching layer over a zip's URL without zip::, or before zip::, was told to pass 'the folder's URL without it' (a
    zip's URL: 'no store … names a zip file', or the zip read uncached). The form that reads it cached is named, and reads."""
    root, base = http_root
    if not (root / "c.zarr.zip").exists():  # the module's server: the first parameter's pack serves both
        pack(tiny_store, root / "c.zarr.zip")
    url, fixed = given.format(base=base), f"zip::simplecache::{base}/c.zarr.zip"
    r = CliRunner().invoke(main, ["info", url])
    assert r.exit_code == 1 and r.output == (f"Error: {url!r}: fsspec's caching layer simplecache:: goes after zip::, not before it "
                                             f"(a zip behind a URL is read through zip::); pass {fixed!r}\n"), r.output
    assert open_store(fixed).complete


class Gate:
    """Holds the first ``k`` requests whose path ``wanted`` picks until all ``k`` have come, or ``timeout`` seconds:
    ``came``, how many came before it opened, is how many the client sends without waiting for an answer, whatever the
    machine's load (a hold of fixed length let a loaded box's late sender look like one waiting for an answer). Once
    open, every request passes."""

    def __init__(self, k: int, wanted: Callable[[str], bool], timeout: float = 10.0):
        import threading

        self.k, self.wanted, self.timeout = k, wanted, timeout
        self.came, self.opened, self.changed = 0, False, threading.Condition()

    def wait(self, path: str) -> None:
        if not self.wanted(path):
            return
        with self.changed:
            if self.opened:
                return
            self.came += 1
            if self.came < self.k:
                self.changed.wait_for(lambda: self.opened, timeout=self.timeout)
            self.opened = True
            self.changed.notify_all()


def test_opening_an_s3_store_asks_for_every_metadata_object_at_once(s3, keep_alive_s3, tiny_store):
    """Opening a remote store read each array's zarr.json when the array was first opened, one after another: 6 to 7
    round trips waited in turn by every command (1-3 s to a bucket across the world, 100-300 ms a request). The opening
    now asks for the groups' and every array's zarr.json (the manifest names them) at once, and the reads after use
    those bytes: all in flight together behind an endpoint holding each request, the requests no more than before."""
    import s3fs

    from kdcache.store import LOGITS

    s3fs.S3FileSystem(**s3, skip_instance_cache=True).put(tiny_store, f"{BUCKET}/waves.zarr", recursive=True)
    options, url = {**s3, "endpoint_url": keep_alive_s3.url}, f"s3://{BUCKET}/waves.zarr"
    first = open_store(url, storage_options=options)  # the first look at the endpoint
    inner = 4 + len(first.paths()) + 2  # the groups' (with targets/layers), the data arrays', done's and digest's zarr.json
    root = f"/{BUCKET}/waves.zarr/zarr.json"
    keep_alive_s3.gate = gate = Gate(inner, lambda path: path.endswith("/zarr.json") and path != root)
    before = len(keep_alive_s3.requests)
    try:
        store = open_store(url, storage_options=options)
        assert store.read(LOGITS, 0, 16).shape == (16, 4) and store.info()["shard_digests"]
        for path in store.paths():
            store.checked_array(path)
    finally:
        keep_alive_s3.gate = None
    assert gate.came == inner, gate.came  # all sent before any was answered; old: 4 (the groups), then one at a time
    metadata = [path for _, path in keep_alive_s3.requests[before:] if path.endswith("/zarr.json")]
    assert len(set(metadata)) == len(metadata) == inner + 1, metadata  # each read once, the root too


def test_export_and_a_training_run_in_memory_ask_for_every_arrays_shards_at_once_from_s3(s3, keep_alive_s3, tiny_store, tmp_path):
    """Export and ``train`` with its targets in memory read one array's shards after another's, a round trip waited
    between the arrays (5 at the tiny store: 0.5-1.5 s across the world); now one array's shards are asked for with the
    next ones' (export: still a few in memory at once)."""
    pytest.importorskip("h5py")
    import s3fs

    from kdcache import cache
    from kdcache.interop import export_hdf5

    s3fs.S3FileSystem(**s3, skip_instance_cache=True).put(tiny_store, f"{BUCKET}/columns.zarr", recursive=True)
    options, url = {**s3, "endpoint_url": keep_alive_s3.url}, f"s3://{BUCKET}/columns.zarr"
    store = open_store(url, storage_options=options)
    store.done_snapshot(), store.digests_snapshot()
    for path in store.paths():
        store.checked_array(path)
    shards = np.arange(store.num_shards)

    def data(path: str) -> bool:
        return "/c/" in path and "/progress/" not in path

    # more than one array's shards sent before any is answered; old: one array's at a time (4), then the gate's timeout
    whole = None
    for read in (lambda: cache._read_whole(store, store.paths(), shards, 1, 1024, url),
                 lambda: export_hdf5(url, tmp_path / "x.h5", storage_options=options)):
        keep_alive_s3.gate = gate = Gate(store.num_shards + 1, data)
        before = len(keep_alive_s3.requests)
        try:
            got = read()
            whole = got if whole is None else whole  # _read_whole's columns (export returns its summary)
        finally:
            keep_alive_s3.gate = None
        assert gate.came == store.num_shards + 1, gate.came
        assert sum(data(path) for _, path in keep_alive_s3.requests[before:]) == store.num_shards * len(store.paths())
    assert {p: len(a) for p, a in whole.items()} == {p: store.num_samples for p in store.paths()}
    import h5py

    with h5py.File(tmp_path / "x.h5") as f:  # each array's rows where its shards go, though read together
        assert all(np.array_equal(f[p][:], whole[p]) for p in store.paths())


# ------------------------------------------------------------------ the remote opening's bytes (session 44's mutants)

def _replaced_by_another_extract(folder, tiny_store, created: str) -> None:
    """The store at ``folder`` replaced by another of the same layout made at ``created`` (another extract --overwrite),
    moved in whole (the old one moved out first, as a sync of a new copy leaves it)."""
    import shutil

    new = folder.with_name(folder.name + ".new")
    shutil.copytree(tiny_store, new)
    meta = json.loads((new / "zarr.json").read_text())
    meta["attributes"]["kdcache"]["created"] = created
    (new / "zarr.json").write_text(json.dumps(meta))
    folder.rename(folder.with_name(folder.name + ".old"))
    new.rename(folder)
    shutil.rmtree(folder.with_name(folder.name + ".old"))


def test_an_http_store_replaced_between_two_openings_is_opened_as_it_is_now(counted_http_root, tiny_store):
    """An opening parses the root zarr.json's bytes its look read (the first look at the endpoint's GET, a later
    opening's bounded GET): each opening's own. Bytes kept from an earlier opening of the location would open a store
    replaced since with the old manifest, pairing the new store's shards with it, and let the check that a Store held is
    still the one there (check_not_replaced, a reader's reopening) pass."""
    from kdcache.errors import StoreReplacedError

    root, base, _ = counted_http_root
    import shutil

    shutil.copytree(tiny_store, root / "t.zarr")
    url = f"{base}/t.zarr"
    first = open_store(url)  # the first look at this endpoint
    for created in ("2030-01-01T00:00:00+00:00", "2030-01-02T00:00:00+00:00"):
        _replaced_by_another_extract(root / "t.zarr", tiny_store, created)
        assert open_store(url).manifest["created"] == created  # a later opening: its own read of the root
        with pytest.raises(StoreReplacedError, match=rf"t\.zarr' was replaced since kdcache\.open_store opened it: its manifest's "
                                                     rf"created was '[^']+' when it was opened and is '{re.escape(created)}' now"):
            first.check_not_replaced()


@pytest.fixture
def finishing_http_root(tmp_path):
    """``(folder, base_url, finish)``: ``folder`` served by RangeHTTPServer's handler in a thread on 127.0.0.1; ``finish``
    maps a request path to a function called once, in the server, before that request is answered (a writer that
    finishes a shard just then); one that returns ``"cut"`` has that answer cut short (half its body sent, the connection
    closed: a connection dropped once)."""
    from pathlib import Path

    handler = pytest.importorskip("RangeHTTPServer").RangeRequestHandler
    finish: dict[str, Callable[[], str | None]] = {}

    class Finishing(handler):  # type: ignore[misc, valid-type]
        def log_message(self, *args: object) -> None:
            pass

        def send_head(self):  # type: ignore[no-untyped-def]
            act = finish.pop(self.path, None)
            if act is not None and act() == "cut":
                body = Path(self.translate_path(self.path)).read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2])
                self.close_connection = True
                return None
            return super().send_head()

    with _serving_in_a_thread(Finishing, tmp_path) as base:
        yield tmp_path, base, finish


def test_a_shard_finished_while_a_reader_takes_its_snapshot_is_read_with_its_digest(finishing_http_root, tiny_store):
    """A reader's first read takes the done markers, then the digest rows: a writer writes a shard's digest row before its
    marker (FORMAT.md §7.1), so a shard finished between the two reads is done with its digest there. Taken the other
    way round, a shard finished between them was done without a digest: refused as damage ("its digest object is
    missing") in a store that is whole. Here the server finishes shard 2 (its digest row, then its marker) as its marker
    is asked for."""
    import shutil

    from kdcache.store import DIGEST, DONE, LOGITS

    root, base, finish = finishing_http_root
    store_dir = root / "w.zarr"
    shutil.copytree(tiny_store, store_dir)
    marker, digest = f"{DONE}/c/2", f"{DIGEST}/c/2/0"
    (store_dir / marker).unlink()  # shard 2 being written: its rows there, its digest row and marker not yet
    (store_dir / digest).unlink()
    finish[f"/w.zarr/{marker}"] = lambda: [shutil.copyfile(f"{tiny_store}/{key}", store_dir / key) for key in (digest, marker)]
    store = open_store(f"{base}/w.zarr")
    lo, hi = store.shard_rows(2)
    np.testing.assert_array_equal(store.read(LOGITS, lo, hi), open_store(tiny_store).read(LOGITS, lo, hi))
    assert finish == {} and store.done_snapshot().all()


@pytest.mark.parametrize("look", ["first", "later"])
@pytest.mark.parametrize("fault", ["500", "truncate"])
def test_a_root_zarr_json_a_server_fails_is_one_line_not_no_store(faulty_http_root, tiny_store, fault, look, monkeypatch):
    """The first look at an endpoint reads the root zarr.json itself, and so does a later opening (one GET whose bytes
    zarr parses; one that fails is decided as before, by a look at the object and then zarr's read). A server that
    fails it (a 5xx, a response cut short) is a one-line error saying the location could not be read: never "no store"
    (whose fix, run kdcache extract, would make a store where one is), never a traceback. A later opening's read cut
    short was aiohttp's ClientPayloadError, raised through open_store (zarr's read of the root, after the look)."""
    import shutil

    root, base = faulty_http_root
    if not (root / "tiny.zarr").exists():
        shutil.copytree(tiny_store, root / "tiny.zarr")
    url = f"{base}/tiny.zarr"
    assert open_store(url).complete  # the first look at the endpoint made: the openings below read the root themselves
    if look == "first":
        from kdcache import storage

        monkeypatch.setattr(storage, "REACHED", set())
    (root / ".faults").write_text(json.dumps({"tiny.zarr/zarr.json": fault}))
    try:
        r = CliRunner().invoke(main, ["info", url])
    finally:
        (root / ".faults").unlink()
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1, r.output
    assert r.output.startswith("Error: cannot re") and "no store" not in r.output and "re-extract" not in r.output, r.output
    assert CliRunner().invoke(main, ["info", url]).exit_code == 0


def test_an_s3_root_zarr_json_of_exactly_the_metadata_bound_opens_at_every_look_and_one_byte_over_is_refused(s3, keep_alive_s3, tiny_store,
                                                                                                            monkeypatch):
    """The first look at an S3 endpoint reads the root zarr.json itself, bounded by MAX_METADATA_BYTES (a later opening's
    GET, and zarr's read of any zarr.json, by the same bound): a root of exactly the bound opens at the first look and
    at a later one alike, one a byte larger is refused at both, naming its size (here the bound is set to the tiny
    store's root: its 128 MiB is not written to a test's bucket)."""
    from pathlib import Path

    import s3fs

    from kdcache import storage

    s3fs.S3FileSystem(**s3, skip_instance_cache=True).put(tiny_store, f"{BUCKET}/bound.zarr", recursive=True)
    options, url = {**s3, "endpoint_url": keep_alive_s3.url}, f"s3://{BUCKET}/bound.zarr"
    size = len((Path(tiny_store) / "zarr.json").read_bytes())
    for bound in (size, size - 1):
        monkeypatch.setattr(storage, "MAX_METADATA_BYTES", bound)
        for look in ("first", "later"):
            if look == "first":
                monkeypatch.setattr(storage, "REACHED", set())
            if bound == size:
                assert open_store(url, storage_options=options).num_samples == 50, look
                continue
            with pytest.raises(StoreError, match=rf"bound\.zarr' is damaged: object 'zarr\.json' holds {size:,} bytes, more than it can "
                                                 rf"\({bound:,}: FORMAT\.md §13\), and is not read"):
                open_store(url, storage_options=options)


def test_a_later_opening_whose_root_zarr_json_is_cut_once_opens_the_store(finishing_http_root, tiny_store):
    """A later opening of an endpoint's store reads the root zarr.json in one GET; one whose answer is cut short (a
    connection dropped once) is decided as before: a look at the object, then zarr's read of it, which find the store
    there and open it, as an opening did before the GET was the look."""
    import shutil

    root, base, finish = finishing_http_root
    shutil.copytree(tiny_store, root / "t.zarr")
    url = f"{base}/t.zarr"
    assert open_store(url).complete  # the first look at the endpoint
    finish["/t.zarr/zarr.json"] = lambda: "cut"
    store = open_store(url)
    assert finish == {} and store.manifest == open_store(tiny_store).manifest and store.complete


@pytest.mark.parametrize("damage", ["node-type-table", "node-type-array", "no-attributes", "a-list", "not-json", "extra-key"])
def test_a_damaged_root_zarr_json_over_http_is_named_as_in_a_folder(counted_http_root, tiny_store, damage):
    """An http(s) or S3 opening parses the root zarr.json's bytes its look read (zarr's private parser, not zarr's
    open_group): what it says of a damaged root must be what the opening of a folder says (zarr's errors, mapped as
    open_group maps them: a node_type not "group" is zarr's "No group found"), the location and zarr's Store aside."""
    import shutil

    from kdcache.errors import KdcacheError

    root, base, _ = counted_http_root
    shutil.copytree(tiny_store, root / "d.zarr")
    meta = json.loads((root / "d.zarr" / "zarr.json").read_text())
    edited = {"node-type-table": lambda: json.dumps({**meta, "node_type": "table"}),
              "node-type-array": lambda: json.dumps({**meta, "node_type": "array"}),
              "no-attributes": lambda: json.dumps({k: v for k, v in meta.items() if k != "attributes"}),
              "a-list": lambda: json.dumps([meta]),
              "not-json": lambda: json.dumps(meta)[:-7],
              "extra-key": lambda: json.dumps({**meta, "shape": [3]})}[damage]()
    (root / "d.zarr" / "zarr.json").write_text(edited)
    said = {}
    for where, location in (("folder", str(root / "d.zarr")), ("http", f"{base}/d.zarr")):
        for look in ("first", "later"):  # the first look at the endpoint reads the root itself, a later opening too
            try:
                said[where, look] = ("opened", open_store(location).num_samples)
            except KdcacheError as e:
                said[where, look] = (type(e).__name__, re.sub(r"in store .+? at path", "in store STORE at path",  # zarr's Store's repr
                                                              str(e).replace(location, "LOCATION")))
    assert said["http", "first"] == said["http", "later"] == said["folder", "first"], said


@pytest.mark.parametrize("missing", ["404", "403"])
def test_a_remote_store_written_before_digests_opens_and_verifies_without_them(s3, keep_alive_s3, tiny_store, tmp_path, missing):
    """The opening asks for progress/digest/zarr.json with every array's, and its answer says whether the store keeps
    digests (has_digests): none there is a store written before kdcache 0.1.1, read and verified without them, not
    "missing the array progress/digest its manifest lists". A bucket granting GetObject only answers a missing key 403:
    such a store too (has_digests reads it again, and takes the 403 as no digests)."""
    import shutil

    import s3fs

    from kdcache.store import DIGEST, LOGITS

    old = tmp_path / "old.zarr"
    shutil.copytree(tiny_store, old)
    shutil.rmtree(old / DIGEST)
    meta = json.loads((old / "zarr.json").read_text())
    del meta["attributes"]["kdcache"]["compression"]["shard_digests"]
    (old / "zarr.json").write_text(json.dumps(meta))
    name = f"old{missing}.zarr"
    s3fs.S3FileSystem(**s3, skip_instance_cache=True).put(str(old), f"{BUCKET}/{name}", recursive=True)
    if missing == "403":
        keep_alive_s3.faults[f"{name}/{DIGEST}/"] = 403
    options, url = {**s3, "endpoint_url": keep_alive_s3.url}, f"s3://{BUCKET}/{name}"
    open_store(url, storage_options=options)  # the first look at the endpoint: the opening below is a later one, as most are
    store = open_store(url, storage_options=options)
    assert not store.has_digests() and store.digests_snapshot() is None and store.info()["shard_digests"] is False
    np.testing.assert_array_equal(store.read(LOGITS, 0, 50), open_store(tiny_store).read(LOGITS, 0, 50))
    report = verify(url, storage_options=options)
    assert report["ok"], report


@pytest.mark.parametrize("where", ["folder", "http"])
def test_read_columns_is_read_shards_of_each_column_in_the_order_asked(counted_http_root, tiny_store, where):
    """Store.read_columns (the streaming reader's and the in-memory load's call: from a remote store every column's
    read made at once) is read_shards of each column: its shards back to back in the order given, each column under
    its own path, whatever the order of the paths and shards asked for."""
    import shutil

    root, base, _ = counted_http_root
    shutil.copytree(tiny_store, root / "c.zarr")
    store = open_store(str(root / "c.zarr") if where == "folder" else f"{base}/c.zarr")
    paths, shards = store.paths()[::-1], [3, 0, 2]
    columns = store.read_columns(paths, shards)
    assert list(columns) == paths
    local = open_store(tiny_store)
    for path in paths:
        np.testing.assert_array_equal(columns[path], np.concatenate([local.read(path, *local.shard_rows(s)) for s in shards]))
