"""Journeys across features, as a team runs them, each step through the command line or the Python API a user calls:
an extract that dies and is resumed by other means, the store handed over (packed and served over http, exported to
HDF5 and imported, written to S3), checked, and trained from, stopped and resumed. Each sample's values name it
(``tests/fixtures/journeys.py``), so a row served with another sample's targets shows at once."""

from __future__ import annotations

import functools
import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

import kdcache
from conftest import FIXTURES, S3_BUCKET
from kdcache.cli import main
from kdcache.verify import verify
from test_train import metrics, same_run, sigterm_at_step

JOURNEYS = FIXTURES / "journeys.py"
ARRAYS = ("samples/index", "samples/fingerprint", "samples/label", "targets/logits", "targets/layers/body")

NUMBERS = f"""
[teacher]
factory = "{JOURNEYS}:teacher"
[data]
factory = "{JOURNEYS}:dataset"
[targets]
layers = ["body"]
dtype = "float32"
topk = 3
[extract]
batch_size = 8
device = "cpu"
rows_per_shard = 16
threads = 1
[student]
factory = "{JOURNEYS}:student"
[train]
epochs = 3
batch_size = 8
lr = 1e-2
device = "cpu"
threads = 1
[train.loss]
kl = 1.0
temperature = 2.0
"""

TEXT = f"""
[teacher]
factory = "{JOURNEYS}:text_teacher"
[data]
factory = "{JOURNEYS}:text_dataset"
[targets]
layers = ["lm.final_norm"]
select = {{ logits = "last", "lm.final_norm" = "mean" }}
mask = "attention_mask"
[extract]
batch_size = 32
device = "cpu"
rows_per_shard = 32
threads = 1
[student]
factory = "{JOURNEYS}:text_student"
select = "last"
inputs = ["input_ids", "attention_mask"]
[train]
epochs = 2
batch_size = 16
lr = 1e-2
device = "cpu"
threads = 1
mask = "attention_mask"
[train.loss]
kl = 1.0
temperature = 2.0
ce = 0.1
[train.features]
"lm.final_norm" = {{ student = "final_norm", select = "mean" }}
"""


def cli(*args: str) -> str:
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r.output


def toml(folder: Path, text: str) -> Path:
    path = folder / "journey.toml"
    path.write_text(text)
    return path


def crashed_extract(monkeypatch: pytest.MonkeyPatch, pipeline: Path, out: Path, at: int, *overrides: str) -> None:
    """``extract`` dies fetching item ``at``: the shards before it are done, the store incomplete."""
    monkeypatch.setenv("JOURNEY_FAIL_AT", str(at))
    with pytest.raises(RuntimeError, match=f"simulated crash fetching index {at}"):
        kdcache.extract(kdcache.load_pipeline(pipeline, list(overrides)), str(out))
    monkeypatch.delenv("JOURNEY_FAIL_AT")
    assert not kdcache.open_store(str(out)).info()["complete"]


def same_arrays(a: str, b: str, paths: tuple[str, ...]) -> None:
    x, y = zarr.open_group(a, mode="r"), zarr.open_group(b, mode="r")
    for path in paths:
        assert np.array_equal(x[path][:], y[path][:]), path


@pytest.fixture
def served(tmp_path: Path):
    """``(folder, base_url)``: ``folder`` served by RangeHTTPServer's handler in a thread on 127.0.0.1."""
    handler = pytest.importorskip("RangeHTTPServer").RangeRequestHandler

    class Quiet(handler):  # type: ignore[misc, valid-type]
        def log_message(self, *args: object) -> None:
            pass

    root = tmp_path / "www"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.slow
def test_a_topk_store_resumed_by_torchrun_packed_served_and_trained_over_http_keeps_every_row_its_own(
        tmp_path: Path, served, monkeypatch: pytest.MonkeyPatch) -> None:
    """Top-k extract dies after 2 of 6 shards; torchrun (2 ranks, --standalone) resumes it into the store --workers 2 (a
    dask LocalCluster) writes; verify, pack, serve the zip over http; train a subset from zip::http, streamed, SIGTERMed mid-epoch and
    resumed: the uninterrupted run's weights and losses. Read back over http by TransferSet, every served row's input,
    stored top class and layer name one sample, in a resumed epoch too."""
    pipeline = toml(tmp_path, NUMBERS)
    store = tmp_path / "k.zarr"
    crashed_extract(monkeypatch, pipeline, store, 40)
    r = subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--nproc-per-node", "2", "--standalone", "-m", "kdcache.cli",
                        "extract", str(pipeline), "--out", str(store)], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0 and "2 of 6 shards were already done" in r.stderr, r.stderr[-3000:]
    cli("extract", pipeline, "--out", tmp_path / "dask.zarr", "--workers", "2")  # a LocalCluster writes it whole
    same_arrays(str(store), str(tmp_path / "dask.zarr"), (*ARRAYS, "targets/logits_indices"))
    assert verify(str(store))["ok"]

    root, base = served
    cli("pack", store, root / "k.zarr.zip")
    url = f"zip::{base}/k.zarr.zip"
    assert verify(url)["ok"]
    p = kdcache.load_pipeline(pipeline, ["train.subset=40", "train.memory_budget_mb=0", "train.shuffle_buffer_shards=2"])
    kdcache.train(p, str(store), tmp_path / "whole")
    sigterm_at_step(monkeypatch, 4)
    with pytest.raises(kdcache.errors.TrainingStopped, match=r"stopped by SIGTERM in epoch 0 after batch 4 \(step 4 of 18\)"):
        kdcache.train(p, url, tmp_path / "cut")
    monkeypatch.undo()
    kdcache.train(p, url, tmp_path / "cut", resume=True)
    same_run(tmp_path / "cut", tmp_path / "whole")

    rows = [2, 3, 17, 40, 63, 64, 80, 95]
    transfer = kdcache.TransferSet(url, kdcache.load_pipeline(pipeline).call("data.factory", "train"), ["logits", "body"],
                                   batch_size=3, seed=1, rows=rows, memory_budget_mb=0, buffer_shards=1)
    epochs = {}
    for epoch, skip in ((1, 0), (1, 1)):
        transfer.set_epoch(epoch, skip=skip)
        epochs[skip] = []
        for batch in transfer:
            i = batch["inputs"][:, 0].long()
            assert torch.equal(batch["index"], i)
            assert torch.equal(batch["targets"]["targets/layers/body"][:, 0].long(), i)
            assert torch.equal(batch["targets"]["targets/logits_indices"][:, 0].long(), i % 16)
            assert torch.equal(batch["targets"]["targets/logits"][:, 0], (i + 1).float() / 8)
            epochs[skip].append(i.tolist())
    assert sorted(sum(epochs[0], [])) == rows and epochs[1] == epochs[0][1:]  # a resumed epoch: the rest, in its order

@pytest.fixture(scope="module")
def s3_env(s3):
    """The moto server's credentials in the environment, as a user's would be (the CLI then needs only the endpoint)."""
    with pytest.MonkeyPatch.context() as m:
        m.setenv("AWS_ACCESS_KEY_ID", s3["key"])
        m.setenv("AWS_SECRET_ACCESS_KEY", s3["secret"])
        yield s3


@pytest.mark.slow
def test_an_s3_store_exported_to_hdf5_and_imported_trains_the_same_student_and_resumes_a_run_stopped_on_s3(
        tmp_path: Path, s3_env, monkeypatch: pytest.MonkeyPatch) -> None:
    """extract to S3, export to HDF5, import into a folder; verify and stats agree on both; a student with features,
    labels and an eval split trains to the same numbers from each; a run SIGTERMed while training from S3 resumes from
    the imported copy (the same teacher, dataset and shards) to the same run."""
    pipeline = toml(tmp_path, NUMBERS.replace("topk = 3", "topk = 0"))
    endpoint = ("--storage-option", f"endpoint_url={s3_env['endpoint_url']}")
    url = f"s3://{S3_BUCKET}/journey-{tmp_path.name}.zarr"
    cli("extract", pipeline, "--out", url, *endpoint)
    cli("export", url, tmp_path / "t.h5", *endpoint)
    cli("import", tmp_path / "t.h5", tmp_path / "imported.zarr")
    for location in (url, tmp_path / "imported.zarr"):
        assert "verified: every check holds" in cli("verify", location, *endpoint if location == url else ())
    stats = [cli("stats", location, "--json", *endpoint if location == url else ()) for location in (url, tmp_path / "imported.zarr")]
    assert [{k: v for k, v in json.loads(s).items() if k != "location"} for s in stats][0] == \
        [{k: v for k, v in json.loads(s).items() if k != "location"} for s in stats][1]

    p = kdcache.load_pipeline(pipeline, ['train.features.body={student="2"}', "train.loss.ce=0.5", "train.eval_split='val'"])
    options = {"endpoint_url": s3_env["endpoint_url"]}
    kdcache.train(p, url, tmp_path / "from-s3", storage_options=options)
    kdcache.train(p, str(tmp_path / "imported.zarr"), tmp_path / "from-import")
    same_run(tmp_path / "from-s3", tmp_path / "from-import")
    assert all(m["eval_accuracy"] is not None for m in metrics(tmp_path / "from-s3"))

    sigterm_at_step(monkeypatch, 7)
    with pytest.raises(kdcache.errors.TrainingStopped):
        kdcache.train(p, url, tmp_path / "cut", storage_options=options)
    monkeypatch.undo()
    kdcache.train(p, str(tmp_path / "imported.zarr"), tmp_path / "cut", resume=True)
    same_run(tmp_path / "cut", tmp_path / "from-s3")


def test_a_padded_text_store_resumed_in_other_batches_trains_on_its_own_inputs_against_a_packed_topk_eval_store(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Text items with a doc_id the student does not take (student.inputs), targets pooled by the padding mask: an
    extract that dies after 2 of 6 shards, resumed in batches of 7, stores the bits of one run in batches of 32; the
    val split extracted with top-k logits and packed is the eval_cache; verify --teacher-check of that store with the
    pipeline as it is (its data.split "train") recomputes the val rows."""
    pipeline = toml(tmp_path, TEXT)
    store = tmp_path / "text.zarr"
    crashed_extract(monkeypatch, pipeline, store, 70)
    assert "2 of 6 shards were already done" in cli("extract", pipeline, "--out", store, "--batch-size", "7")
    cli("extract", pipeline, "--out", tmp_path / "once.zarr")
    same_arrays(str(store), str(tmp_path / "once.zarr"),
                ("samples/fingerprint", "samples/label", "targets/logits", "targets/layers/lm.final_norm"))

    cli("extract", pipeline, "--out", tmp_path / "val.zarr", "--set", "data.split='val'", "--set", "targets.topk=8")
    cli("pack", tmp_path / "val.zarr", tmp_path / "val.zarr.zip")
    r = CliRunner().invoke(main, ["verify", str(tmp_path / "val.zarr.zip"), "--teacher-check", "8", "--pipeline", str(pipeline)])
    assert r.exit_code == 0 and "verified: every check holds" in r.output, r.output

    cli("train", pipeline, "--cache", store, "--out", tmp_path / "run", "--eval-cache", tmp_path / "val.zarr.zip")
    lines = metrics(tmp_path / "run")
    assert lines[-1]["loss"] < lines[0]["loss"] and 0 < lines[-1]["eval_agreement"] <= 1
    assert json.loads((tmp_path / "run" / "pipeline.json").read_text())["student"]["inputs"] == ["input_ids", "attention_mask"]


@pytest.mark.slow
def test_a_requeued_job_stopped_twice_mid_epoch_in_two_streams_with_dataloader_workers_ends_as_the_uninterrupted_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The job a scheduler requeues: the same call (resume="auto", as --auto-resume) three times, SIGTERMed in epoch 0
    and again after a checkpoint_every save in epoch 1; streamed targets, two streams a step, two DataLoader workers,
    feature KD through a projection head, labels and an eval split. Its weights, heads and per-epoch losses are the
    uninterrupted run's, bit for bit."""
    pipeline = toml(tmp_path, NUMBERS.replace("topk = 3", "topk = 0"))
    store = tmp_path / "s.zarr"
    cli("extract", pipeline, "--out", store)
    p = kdcache.load_pipeline(pipeline, ["train.streams=2", "train.num_workers=2", "train.memory_budget_mb=0",
                                         "train.shuffle_buffer_shards=1", "train.checkpoint_every=4",
                                         'train.features.body.student="2"', "train.loss.ce=0.5", "train.eval_split='val'"])
    kdcache.train(p, str(store), tmp_path / "whole")
    for step in (3, 5):  # each call counts its own steps: stopped at global step 3, then at 3 + 5 = 8 (epoch 1)
        sigterm_at_step(monkeypatch, step)
        with pytest.raises(kdcache.errors.TrainingStopped, match="after batch"):
            kdcache.train(p, str(store), tmp_path / "job", resume="auto")
        monkeypatch.undo()
    kdcache.train(p, str(store), tmp_path / "job", resume="auto")
    same_run(tmp_path / "job", tmp_path / "whole")
    assert [m["eval_accuracy"] for m in metrics(tmp_path / "job")] == [m["eval_accuracy"] for m in metrics(tmp_path / "whole")]


def test_an_hdf5_file_written_by_plain_h5py_imports_resumes_as_complete_trains_and_exports_as_the_source_store(
        tmp_path: Path) -> None:
    """Another tool's HDF5 file of FORMAT.md §16 (h5py: contiguous, uncompressed datasets, the manifest a bytes
    attribute) imports into a store that verifies, that extract finds complete with the pipeline it came from and
    refuses with another dtype, that trains the student the source store trains, and that exports the source's arrays."""
    h5py = pytest.importorskip("h5py")
    pipeline = toml(tmp_path, NUMBERS.replace("topk = 3", "topk = 0"))
    cli("extract", pipeline, "--out", tmp_path / "s.zarr")
    cli("export", tmp_path / "s.zarr", tmp_path / "s.h5")
    with h5py.File(tmp_path / "s.h5", "r") as src, h5py.File(tmp_path / "foreign.h5", "w") as dst:
        dst.attrs["kdcache"] = np.bytes_(src.attrs["kdcache"].encode())
        dst.attrs["kdcache_hdf5_version"] = 1
        for name in ("progress/done", "progress/digest", *ARRAYS):  # contiguous, uncompressed: h5py's defaults
            dst.create_dataset(name, data=src[name][:])
    store = tmp_path / "imported.zarr"
    cli("import", tmp_path / "foreign.h5", store)
    assert "verified: every check holds" in cli("verify", store)
    r = CliRunner().invoke(main, ["extract", str(pipeline), "--out", str(store)])
    assert r.exit_code == 0 and "is already complete (96 samples); nothing to do" in r.output, r.output
    r = CliRunner().invoke(main, ["extract", str(pipeline), "--out", str(store), "--set", "targets.dtype='float16'"])
    assert r.exit_code == 1 and "different targets (targets.logits.dtype: store has 'float32', now 'float16')" in r.output, r.output
    same_arrays(str(store), str(tmp_path / "s.zarr"), (*ARRAYS, "progress/digest"))

    p = kdcache.load_pipeline(pipeline, ['train.features.body.student="2"', "train.epochs=2"])
    kdcache.train(p, str(store), tmp_path / "from-import")
    kdcache.train(p, str(tmp_path / "s.zarr"), tmp_path / "from-source")
    same_run(tmp_path / "from-import", tmp_path / "from-source")
    cli("export", store, tmp_path / "again.h5")
    with h5py.File(tmp_path / "s.h5", "r") as a, h5py.File(tmp_path / "again.h5", "r") as b:
        assert all(np.array_equal(a[path][:], b[path][:]) for path in (*ARRAYS, "progress/done", "progress/digest"))
