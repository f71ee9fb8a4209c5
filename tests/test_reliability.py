"""Reliability (issue 8): kill -9 at exact write moments, readers during a write, a full disk.

Faults are injected by ``tests/fixtures/faults.py``, which wraps the calls every write goes through
(``os.writev`` / ``os.replace``: kdcache's temp files and zarr's, which ``storage.write_file`` writes; ``torch.save``)
and counts them as events; a run is killed (SIGKILL) or made to fail (ENOSPC) at event N. An
uninterrupted run, with the same wrappers only counting, gives both the reference result and the
list of events the N are drawn from (seeded), so each kill lands on a known moment.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import threading
import sys
import time
import zipfile
from collections import Counter
from pathlib import Path

import click
import numpy as np
import pytest
import torch
from click.testing import CliRunner

import faults
from conftest import TINY_TOML
from kdcache.extract import RESUMED_ROWS, RESUMED_SHARDS
from kdcache.cli import main
from kdcache.store import open_store
from reference import FIXTURES, file_bytes, read_store, without_times, write_toml

FAULTS = FIXTURES / "faults.py"
N, ROWS = 50, 16  # 4 shards: 16 + 16 + 16 + 2 rows (the last one is written through zarr, the others directly)
TRAIN_EPOCHS = 3
PLAIN = ["--set", "train.features={}", "--set", "train.eval_split=''"]
STUDENT = ["--set", f'student.factory="{FIXTURES / "faults.py"}:student"', "--set", "train.loss.kl=1.0", "--set", "train.device=\"cpu\"",
           "--set", "train.batch_size=4"]


def invoke(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def env(**extra: object) -> dict[str, str]:
    """The environment of a kdcache subprocess: one torch thread (as this process), no ZOO_* from the caller."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("ZOO_", "KDCACHE_FAULT"))}
    return base | {"OMP_NUM_THREADS": "1"} | {k: str(v) for k, v in extra.items()}


def run_with_fault(fault: str, log: Path, root: Path, *args: object, timeout: float = 120, **zoo: object) -> subprocess.CompletedProcess:
    """``kdcache ARGS`` in a subprocess with ``fault`` (``kill:N`` / ``enospc:N`` / ``termgroup:N``) injected, in a
    process group of its own (``termgroup`` signals that group). A ``kill`` lands on a write or a step, long after
    Python's start: that process is forked with torch and kdcache imported already (``faults.run_forked``)."""
    extra = {f"ZOO_{k}": v for k, v in zoo.items()} | {"KDCACHE_FAULT": fault, "KDCACHE_FAULT_LOG": log, "KDCACHE_FAULT_ROOT": root}
    if fault.startswith("kill:"):
        return faults.run_forked([*map(str, args), "--no-progress"], env(**extra), timeout=timeout, new_session=True)
    return subprocess.run([sys.executable, str(FAULTS), *map(str, args), "--no-progress"], env=env(**extra),
                          capture_output=True, timeout=timeout, start_new_session=True)


def counted(log: Path, root: Path, *args: object):
    """Run ``kdcache ARGS`` in this process with every write event counted; returns the CliRunner result."""
    f = faults.install("count", 0, str(log), str(root))
    try:
        return invoke(*args)
    finally:
        f.uninstall()


def assert_one_line_error(output: str, *match: str) -> None:
    assert "Traceback" not in output, output
    lines = output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), output
    for m in match:
        assert m in lines[0], lines[0]


def assert_same_store(got: Path, want: Path) -> None:
    """Equal manifests (but for timestamps), equal arrays, byte-identical files, rows 0..N-1 in order."""
    got_manifest, got_arrays = read_store(got)
    want_manifest, want_arrays = read_store(want)
    assert without_times(got_manifest) == without_times(want_manifest)
    assert got_manifest["completed"] is not None
    assert got_arrays.keys() == want_arrays.keys()
    for path in want_arrays:
        assert got_arrays[path].dtype == want_arrays[path].dtype, path
        np.testing.assert_array_equal(got_arrays[path], want_arrays[path], err_msg=path)
    np.testing.assert_array_equal(got_arrays["samples/index"], np.arange(len(want_arrays["samples/index"])))
    assert got_arrays["progress/done"].all()
    got_files, want_files = file_bytes(got), file_bytes(want)
    assert sorted(got_files) == sorted(want_files), "leftover or missing files"
    assert got_files == want_files


def temp_files(location: Path) -> list[str]:
    return sorted(str(p.relative_to(location)) for p in location.rglob("*") if p.name.endswith((".tmp", ".partial")))


# ------------------------------------------------------------------------------ 1. kill -9: extract


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """The zoo pipeline (logits + two layers, 4 shards) and its uninterrupted store, extracted with every write counted."""
    root = tmp_path_factory.mktemp("zoo")
    toml = write_toml(root / "p.toml", f"extract.rows_per_shard={ROWS}")
    result = counted(root / "events.log", root, "extract", toml, "--out", root / "reference.zarr")
    assert result.exit_code == 0, result.output
    return {"root": root, "toml": toml, "reference": root / "reference.zarr", "events": faults.read_log(root / "events.log")}


def kill_moments(events: list[tuple[int, str, str]], seed: int = 8) -> list[tuple[str, int]]:
    """Ten seeded kill points (category, event number), spread over the phases of a run."""
    rng = random.Random(seed)
    first_shard = min(n for n, kind, p in events if "/c/" in p)
    manifest = [n for n, kind, p in events if p == "reference.zarr/zarr.UUID.partial" and kind == "write"]
    creation_manifest, final_manifest = max(n for n in manifest if n < first_shard), manifest[-1]
    data = [e for e in events if "/c/" in e[2] and "progress/done" not in e[2]]
    early = [n for n, _, _ in events if n < creation_manifest]
    mid_shard = [n for n, kind, _ in data if kind == "write"]  # a shard object's bytes being written
    # a shard's object(s) in place, its done flag not yet: after a rename, or while the flag is written
    before_done = [n for n, kind, _ in data if kind == "committed"] + [n for n, kind, p in events if "progress/done/c" in p and kind != "committed"]
    points = [("early", n) for n in rng.sample(early, 2)] + [("mid-shard", n) for n in rng.sample(mid_shard, 3)]
    points += [("before-done", n) for n in rng.sample(before_done, 3)]
    points += [("manifest", creation_manifest), ("manifest", rng.choice(range(final_manifest, events[-1][0] + 1)))]
    return points


def shard_of(key: str) -> int:
    """The shard a storage key (or a temp file of one) belongs to: ``a/c/2/0``, ``a/c/.2.123.tmp``, ``a/c/3.ab12.partial``."""
    first = key.split("/c/", 1)[1].split("/")[0]
    return int(first.split(".")[1] if first.startswith(".") else first.split(".")[0])


def done_flags(location: Path, shards: int = 4) -> np.ndarray:
    """``progress/done`` of a store, or all false where the run died before the manifest was written."""
    try:
        return open_store(location).done()
    except Exception:  # noqa: BLE001 - no store (yet) at all
        return np.zeros(shards, bool)


@pytest.mark.slow
def test_extract_killed_at_ten_moments_resumes_to_the_uninterrupted_store(zoo, tmp_path, zoo_env, fetch_log):
    events = {n: (kind, path) for n, kind, path in zoo["events"]}
    moments = kill_moments(zoo["events"])
    assert Counter(c for c, _ in moments) == {"early": 2, "mid-shard": 3, "before-done": 3, "manifest": 2}
    for i, (category, n) in enumerate(moments):
        out = tmp_path / f"k{i}" / "reference.zarr"  # the same name as the reference, so event paths line up
        out.parent.mkdir()
        proc = run_with_fault(f"kill:{n}", out.parent / "events.log", out.parent, "extract", zoo["toml"], "--out", out)
        where = f"kill {i} ({category}) at event {n} {events[n]}"
        assert proc.returncode == -signal.SIGKILL, f"{where}: {proc.stderr.decode()[-2000:]}"
        hit = faults.read_log(out.parent / "events.log")[-1]
        if category == "early":  # zarr writes the metadata of a node and its parents concurrently: their order varies
            creation = {(kind, path) for m, (kind, path) in events.items() if m < moments[-2][1]}
            assert hit[0] == n and tuple(hit[1:]) in creation, f"{where}: the killed run hit {hit}"
        else:
            assert hit[:2] == (n, events[n][0]), f"{where}: the killed run hit {hit}"
        done = done_flags(out)
        if category in ("mid-shard", "before-done"):
            assert not done[shard_of(events[n][1])], f"{where}: a shard was marked done before its data was written"

        fetch_log(clear=True)
        result = invoke("extract", zoo["toml"], "--out", out, "--no-progress")  # the same command, resumed
        assert result.exit_code == 0, f"{where}: {result.output}"
        assert_same_store(out, zoo["reference"])
        done_rows = {r for s in np.flatnonzero(done) for r in range(s * ROWS, min(s * ROWS + ROWS, N))}
        probe = set(range(8)) | {N - 1}  # the probe batch and the last item (identity check)
        fetched = Counter(fetch_log())
        rechecked = (set(fetched) & done_rows) - probe  # the resume's check of a few done rows' inputs (no teacher work)
        assert len(rechecked) <= RESUMED_SHARDS * RESUMED_ROWS, f"{where}: rows of shards marked done were fetched again"
        assert all(c == 1 for r, c in fetched.items() if r not in probe), f"{where}: a row was fetched twice"


# ------------------------------------------------------------------------------ 1. kill -9: train


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_store):
    """An uninterrupted training run (every write event counted) and its outputs."""
    root = tmp_path_factory.mktemp("train")
    args = ["train", TINY_TOML, "--cache", tiny_store, "--out", root / "reference", "--epochs", TRAIN_EPOCHS, *PLAIN, "--no-progress"]
    result = counted(root / "events.log", root, *args)
    assert result.exit_code == 0, result.output
    return {"root": root, "store": tiny_store, "reference": root / "reference", "events": faults.read_log(root / "events.log")}


def assert_same_training(got: Path, want: Path) -> None:
    for name in ("student.pt", "heads.pt"):
        a, b = torch.load(got / name, weights_only=True), torch.load(want / name, weights_only=True)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b), name
    lines = [json.loads(x) for x in (got / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in (want / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == list(range(TRAIN_EPOCHS))
    assert [m["loss"] for m in lines] == [m["loss"] for m in ref]
    assert not [p.name for p in got.iterdir() if p.name.endswith(".tmp")]


def train_moments(events: list[tuple[int, str, str]], seed: int = 8) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    steps = [n for n, kind, _ in events if kind == "step"]
    ckpt = [n for n, kind, p in events if p.endswith(("checkpoint.pt.tmp", "checkpoint.pt"))]
    first, last_ckpt = ckpt[0], ckpt[-1]
    final = [n for n, kind, p in events if n > last_ckpt and p.endswith(("student.pt", "heads.pt", ".pt.tmp"))]
    return [("mid-epoch 0", rng.choice([n for n in steps if n < first])), ("mid-epoch", rng.choice([n for n in steps if n > first])),
            ("checkpoint write", rng.choice([n for n, kind, p in events if kind == "write" and "checkpoint" in p and n > first])),
            ("checkpoint", rng.choice(ckpt)),
            ("final weights", rng.choice(final))]


@pytest.mark.slow
def test_train_killed_at_seeded_moments_resumes_to_the_uninterrupted_weights(trained, tmp_path):
    events = {n: (kind, path) for n, kind, path in trained["events"]}
    for i, (category, n) in enumerate(train_moments(trained["events"])):
        out = tmp_path / f"r{i}" / "reference"
        out.parent.mkdir()
        args = ["train", TINY_TOML, "--cache", trained["store"], "--out", out, "--epochs", TRAIN_EPOCHS, *PLAIN]
        proc = run_with_fault(f"kill:{n}", out.parent / "events.log", out.parent, *args)
        where = f"kill {i} ({category}) at event {n} {events[n]}"
        assert proc.returncode == -signal.SIGKILL, f"{where}: {proc.stderr.decode()[-2000:]}"
        if (out / "checkpoint.pt").exists():  # whatever the moment, a checkpoint present is a whole one
            ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
            assert 1 <= ckpt["epoch"] <= TRAIN_EPOCHS, where
        resume = ["--resume"] if (out / "checkpoint.pt").exists() else []  # none yet: start again
        result = invoke(*args, *resume, "--no-progress")
        assert result.exit_code == 0, f"{where}: {result.output}"
        assert_same_training(out, trained["reference"])


def test_train_killed_while_it_appends_a_metrics_line_resumes_to_the_uninterrupted_run(trained, tmp_path):
    """metrics.jsonl is written whole (a temp file renamed) once per process, and each later epoch's line appended (was:
    read and written whole at every epoch, quadratic in the epochs). A kill in the middle of an append leaves half a
    line; --resume leaves it out and reaches the uninterrupted weights and metrics."""
    appends = [n for n, kind, p in trained["events"] if kind == "write" and p.endswith("metrics.jsonl")]
    assert len(appends) == TRAIN_EPOCHS - 1, appends
    out = tmp_path / "reference"
    args = ["train", TINY_TOML, "--cache", trained["store"], "--out", out, "--epochs", TRAIN_EPOCHS, *PLAIN]
    proc = run_with_fault(f"kill:{appends[0]}", tmp_path / "events.log", tmp_path, *args)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert not (out / "metrics.jsonl").read_text().endswith("\n"), "half a line was left"
    result = invoke(*args, "--resume", "--no-progress")
    assert result.exit_code == 0, result.output
    assert_same_training(out, trained["reference"])


@pytest.mark.parametrize("killed", ["writing-the-checkpoint", "appending-the-line"])
def test_train_killed_between_a_metrics_line_and_its_checkpoint_resumed_with_no_step_left_drops_that_line(trained, tmp_path, killed):
    """Killed as epoch 1's checkpoint is written, its metrics line appended already (or as that line is appended: half of
    it): the checkpoint is epoch 0's. A --resume whose plan ends there (--epochs 1) trains no step: it kept epoch 1's
    line, which the weights it wrote never trained, and returned it as the run's last metrics (epoch 1, step 14), or kept
    the half line in the file. Both are dropped as the run resumes."""
    import kdcache

    ckpt = [n for n, kind, p in trained["events"] if kind == "write" and "checkpoint.pt" in p]
    appends = [n for n, kind, p in trained["events"] if kind == "write" and p.endswith("metrics.jsonl")]  # epoch 1's first
    n = ckpt[1] if killed == "writing-the-checkpoint" else appends[0]
    out = tmp_path / "reference"
    args = ["train", TINY_TOML, "--cache", trained["store"], "--out", out, "--epochs", TRAIN_EPOCHS, *PLAIN]
    proc = run_with_fault(f"kill:{n}", tmp_path / "events.log", tmp_path, *args)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert (out / "metrics.jsonl").read_text().count("\n") == (2 if killed == "writing-the-checkpoint" else 1)
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1  # saved after epoch 0
    p = kdcache.load_pipeline(TINY_TOML, ["train.features={}", "train.eval_split=''", "train.epochs=1"])
    result = kdcache.train(p, trained["store"], out, resume=True)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in (trained["reference"] / "metrics.jsonl").read_text().splitlines()]
    assert [(m["epoch"], m["step"], m["loss"]) for m in lines] == [(0, ref[0]["step"], ref[0]["loss"])]
    assert (result["epoch"], result["step"], result["loss"]) == (0, ref[0]["step"], ref[0]["loss"])
    assert (out / "metrics.jsonl").read_text().endswith("\n")


@pytest.mark.parametrize("workers", [0, 2], ids=["no-workers", "dataloader-workers"])
def test_train_sigterm_to_its_process_group_stops_at_a_checkpoint_and_resumes(trained, tmp_path, workers):
    """SIGTERM to every process of the job (a batch scheduler's preemption or time limit; its DataLoader workers too)
    as step 10 begins: the run finishes the step, saves a checkpoint inside epoch 1 and exits 143 with one line; the
    --resume it names reaches the uninterrupted weights and losses (in RAM the batch order is the same for any
    number of workers)."""
    step = [n for n, kind, _ in trained["events"] if kind == "step"][9]
    out = tmp_path / "reference"
    args = ["train", TINY_TOML, "--cache", trained["store"], "--out", out, "--epochs", TRAIN_EPOCHS, *PLAIN,
            "--set", f"train.num_workers={workers}"]
    proc = run_with_fault(f"termgroup:{step}", tmp_path / "events.log", tmp_path, *args)
    stderr = proc.stderr.decode()
    assert proc.returncode == 143, stderr[-2000:]
    assert_one_line_error(stderr, f"Error: stopped by SIGTERM in epoch 1 after batch 3 (step 10 of 21); its checkpoint is saved in {str(out)!r}: "
                                  "run the same command with --resume to continue")
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 10 and not (out / "student.pt").exists()
    result = invoke(*args, "--resume", "--no-progress")
    assert result.exit_code == 0, result.output
    assert_same_training(out, trained["reference"])


# ------------------------------------------------------------------------------ a DataLoader worker killed

KILLED = ["--set", "data.factory='numbered.py:tiny_killed'"]  # tiny.dataset's items, its N-th read in a worker killing that worker


def killed_at(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, n: int, sig: str = "SIGKILL") -> Path:
    """``numbered.tiny_killed`` set to kill the DataLoader worker that makes its ``n``-th read with ``sig``, once; returns the
    file counting the reads (a byte each)."""
    count = tmp_path / "reads"
    for name, value in {"": count, "_AT": n, "_SIGNAL": sig}.items():
        monkeypatch.setenv(f"KDCACHE_TEST_KILLED{name}", str(value))
    return count


@pytest.mark.parametrize("when", ["before-its-first-checkpoint", "after-a-checkpoint"])
def test_train_whose_dataloader_worker_is_killed_says_so_in_one_line_and_resumes(trained, tmp_path, monkeypatch, when):
    """A DataLoader worker SIGKILLed (as the out-of-memory killer does) in epoch 0, or in epoch 2 once a checkpoint is
    saved: the run ends with one line naming the worker's pid, the signal and its fix (lower train.num_workers, the
    memory budget or the batch size), and after a checkpoint that a --resume goes on from it; the rerun it names
    reaches the uninterrupted weights. Was torch's traceback, "RuntimeError: DataLoader worker (pid(s) N) exited
    unexpectedly", chained to its SIGCHLD handler's "… is killed by signal: Killed."."""
    killed_at(monkeypatch, tmp_path, 20 if when == "before-its-first-checkpoint" else 125)  # 50 reads an epoch
    out = tmp_path / "reference"
    args = ["train", TINY_TOML, "--cache", trained["store"], "--out", out, "--epochs", TRAIN_EPOCHS, *PLAIN,
            "--set", "train.num_workers=2", *KILLED, "--no-progress"]
    result = invoke(*args)
    assert result.exit_code == 1, result.output
    assert_one_line_error(result.output)
    fix = "lower train.num_workers, train.memory_budget_mb or train.batch_size, then "
    if when == "before-its-first-checkpoint":
        assert re.fullmatch(r"Error: train's DataLoader worker \(pid \d+\) was killed by SIGKILL, most likely by the out-of-memory "
                            rf"killer \(dmesg names the pid it killed\); give the workers less to hold: {fix}rerun", result.output.strip())
        assert not (out / "checkpoint.pt").exists()
        again = invoke(*args)
    else:
        assert re.fullmatch(r"Error: train's DataLoader worker \(pid \d+\) was killed by SIGKILL, .*: "
                            rf"{fix}run the same command with --resume to go on from its last checkpoint \(after epoch [01]\b.*\)",
                            result.output.strip()), result.output
        assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] in (1, 2)
        again = invoke(*args, "--resume")
    assert again.exit_code == 0, again.output
    assert_same_training(out, trained["reference"])


@pytest.mark.parametrize("called", ["cli", "api"])
def test_extract_whose_dataloader_worker_is_killed_raises_it_and_resumes(tmp_path, monkeypatch, called):
    """A DataLoader worker of extract SIGKILLed at the 48th of the 50 reads (batches of 4: the first shard is written by
    then): the command says so in one line (kdcache.extract raises a DataLoaderWorkerError naming the pid and the
    signal), the shards written before are kept, and the rerun reads none of them again, reaching the uninterrupted
    store. Was torch's traceback."""
    import kdcache
    from kdcache.errors import DataLoaderWorkerError

    args = ["extract", TINY_TOML, "--set", "extract.num_workers=2", "--set", "extract.batch_size=4", *KILLED, "--no-progress"]
    assert invoke(*args, "--out", tmp_path / "uninterrupted.zarr").exit_code == 0  # tiny.dataset's items, nothing killed
    count, out = killed_at(monkeypatch, tmp_path, 48), tmp_path / "killed.zarr"
    if called == "cli":
        result = invoke(*args, "--out", out)
        assert result.exit_code == 1, result.output
        assert_one_line_error(result.output)
        assert re.fullmatch(r"Error: extract's DataLoader worker \(pid \d+\) was killed by SIGKILL, most likely by the out-of-memory "
                            r"killer .*; give the workers less to hold: lower extract.num_workers or extract.batch_size, then rerun",
                            result.output.strip()), result.output
    else:
        p = kdcache.load_pipeline(TINY_TOML, ["extract.num_workers=2", "extract.batch_size=4", KILLED[1]])
        with pytest.raises(DataLoaderWorkerError, match=r"^extract's DataLoader worker \(pid \d+\) was killed by SIGKILL") as e:
            kdcache.extract(p, out)
        assert e.value.signal == signal.SIGKILL and len(e.value.pids) == 1 and f"(pid {e.value.pids[0]})" in str(e.value)
    done, read = done_flags(out), count.stat().st_size
    assert done[0], "the first shard, whole before the worker was killed, is written"
    assert invoke(*args, "--out", out).exit_code == 0
    assert count.stat().st_size - read == 50 - 16 * int(done[:3].sum()) - 2 * int(done[3]), "done shards are read again"
    assert_same_store(out, tmp_path / "uninterrupted.zarr")


@pytest.mark.parametrize("sig", ["SIGBUS", "SIGSEGV"])
def test_a_dataloader_worker_that_crashes_leaves_the_run_s_one_line_alone_on_stderr(tmp_path, monkeypatch, capfd, sig):
    """A DataLoader worker killed by SIGBUS (a full /dev/shm) or SIGSEGV (a crash in the dataset's code): torch's handler
    in the worker wrote its own line to stderr ("ERROR: Unexpected bus error encountered in worker. …") before the
    run's; the worker now dies by the signal without it (``data.worker_signals``), and the run's line names it."""
    killed_at(monkeypatch, tmp_path, 20, sig)
    result = invoke("extract", TINY_TOML, "--set", "extract.num_workers=2", "--set", "extract.batch_size=4", *KILLED, "--no-progress",
                    "--out", tmp_path / "killed.zarr")
    assert result.exit_code == 1 and f"was killed by {sig}" in result.output, result.output
    assert_one_line_error(result.output)
    assert capfd.readouterr().err == "", "a line besides the run's on stderr"


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGBUS", "SIGSEGV"])
def test_a_dataloader_worker_killed_by_a_signal_is_named_with_the_fix_that_signal_calls_for(tmp_path, monkeypatch, sig):
    """A DataLoader worker killed by a real signal as extract's batches are read (``data.stopped``): one
    DataLoaderWorkerError naming its pid, the signal and the fix by signal (SIGKILL: the out-of-memory killer; SIGBUS: a
    full /dev/shm; another: a crash in the dataset's code), from torch's report (its SIGCHLD handler's "… is killed by
    signal: Bus error. It is possible …", the iterator's "… exited unexpectedly" raised from it) or, a worker killed as it
    handed a batch over, from the ConnectionResetError its shared memory gave and the worker's exit status. Stopping the
    workers after it, torch reports the dead one again: not raised in its place."""
    import numbered
    from torch.utils.data import DataLoader

    from kdcache import data
    from kdcache.errors import DataLoaderWorkerError

    killed_at(monkeypatch, tmp_path, 3, sig)
    with pytest.raises(DataLoaderWorkerError) as raised:
        with data.stopped(iter(DataLoader(numbered.tiny_killed(), batch_size=2, num_workers=1)), "extract") as batches:
            list(batches)
    pid = batches._workers[0].pid
    assert raised.value.pids == (pid,) and raised.value.signal == signal.Signals[sig]
    fix = {"SIGKILL": "was killed by SIGKILL, most likely by the out-of-memory killer (dmesg names the pid it killed); give the "
                      "workers less to hold: lower extract.num_workers or extract.batch_size, then rerun",
           "SIGBUS": "was killed by SIGBUS, most likely a full /dev/shm (the shared memory workers hand their batches over in); "
                     "enlarge it (docker run --shm-size=8g; Kubernetes: an emptyDir of medium Memory) or lower extract.num_workers, "
                     "then rerun",
           "SIGSEGV": "was killed by SIGSEGV: the dataset's code (or a library it calls) crashed in it; set extract.num_workers = 0 "
                      "to see its error in the main process, fix it, then rerun"}[sig]
    assert str(raised.value) == f"extract's DataLoader worker (pid {pid}) {fix}"


def test_worker_died_reads_torch_s_reports_of_a_dead_dataloader_worker():
    """torch 2.13's words for a DataLoader worker that died (``torch/csrc/DataLoader.cpp``, ``dataloader.py``), chained as
    torch chains them; and a worker's exit status where torch said nothing (a ConnectionResetError). Not one: None."""
    from kdcache.errors import ModelError, StoreError, worker_died

    def chained(first: str, then: str) -> BaseException:
        try:
            try:
                raise RuntimeError(first)
            except RuntimeError as e:
                raise RuntimeError(then) from e
        except RuntimeError as e:
            return e

    said = {"Killed": "SIGKILL, most likely by the out-of-memory killer", "Bus error": "SIGBUS, most likely a full /dev/shm",
            "Segmentation fault": "SIGSEGV: the dataset's code", "Aborted": "SIGABRT: the dataset's code"}
    for name, words in said.items():
        note = " It is possible that dataloader's workers are out of shared memory. Please try to raise your shared memory limit." \
            if name == "Bus error" else ""
        e = chained(f"DataLoader worker (pid 4711) is killed by signal: {name}.{note} ", "DataLoader worker (pid(s) 4711) exited unexpectedly")
        died = worker_died(e, "train")
        assert died is not None and died.pids == (4711,) and str(died).startswith(f"train's DataLoader worker (pid 4711) was killed by {words}")
        assert str(worker_died(e.__cause__, "train")) == str(died)  # the SIGCHLD handler's alone (raised outside the iterator)
    exited = worker_died(RuntimeError("DataLoader worker (pid 7) exited unexpectedly with exit code 3. Details are lost due to "
                                      "multiprocessing. Rerunning with num_workers=0 may give better error trace."), "train")
    assert exited is not None and exited.signal is None and str(exited).startswith("train's DataLoader worker (pid 7) exited with exit code 3: ")
    gone = worker_died(RuntimeError("DataLoader worker (pid(s) 8, 9) exited unexpectedly"), "extract")
    assert gone is not None and str(gone).startswith("extract's DataLoader workers (pids 8, 9) ended unexpectedly, torch did not say how")
    reset = worker_died(ConnectionResetError(104, "Connection reset by peer"), "extract", {10: -signal.SIGKILL, 11: 0})
    assert reset is not None and reset.pids == (10,) and str(reset).startswith("extract's DataLoader worker (pid 10) was killed by SIGKILL")
    forward = ModelError("the teacher model raised RuntimeError: DataLoader worker (pid 12) is killed by signal: Killed. on a batch of …")
    assert worker_died(forward, "extract").pids == (12,)  # the SIGCHLD handler's error, raised in the forward pass
    assert worker_died(ConnectionResetError(104, "Connection reset by peer"), "extract", {10: 0}) is None
    assert worker_died(StoreError("no store at 'x'"), "train", {10: -signal.SIGKILL}) is None  # kdcache's own line stays
    assert worker_died(RuntimeError("CUDA error: device-side assert triggered"), "train") is None


def waiting(pid: int, within: float = 240.0) -> None:
    """Return once process ``pid``'s main thread has slept (state S: blocked, not training) for a second on end."""
    deadline, since = time.monotonic() + within, None  # within: 60 s was too short for a loaded box's epoch
    while time.monotonic() < deadline:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        since = (since or time.monotonic()) if state == "S" else None
        if since is not None and time.monotonic() - since > 1.0:
            return
        time.sleep(0.02)
    raise AssertionError(f"process {pid} never waited in {within:g} s (state {state})")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signal_that_lands_in_an_import_waits_for_it_then_stops_the_command(sig, tmp_path, monkeypatch):
    """A preempted job's SIGTERM in its first second landed inside torch's import (train imports it as it starts): the
    exception raised there left torch half made and the process was once aborted (exit -6) instead of saying its line.
    The import runs to its end first, then the command stops with its one line; an import that hangs is cut short
    after ``cli.PUT_OFF_S``."""
    import kdcache.cli as cli

    (tmp_path / "slow_import.py").write_text("import signal, threading, time\n"
                                             f"signal.pthread_kill(threading.main_thread().ident, {int(sig)})\n"
                                             "time.sleep(0.3)  # the handler runs here, in the import\nDONE = True\n")
    (tmp_path / "hung_import.py").write_text("import signal, threading, time\n"
                                             f"signal.pthread_kill(threading.main_thread().ident, {int(sig)})\n"
                                             "time.sleep(60)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    # the import that ends is waited for however long it takes (with 1 s for both, a loaded box's 0.3 s sleep that ended
    # past 1 s cut that import short too); the hung one is cut short after 1 s; either stops the command well within
    # the export's 60 s (a bound of 4 s against 5 left a loaded box no room)
    for name, put_off_s in (("slow_import", 60.0), ("hung_import", 1.0)):
        monkeypatch.setattr(cli, "PUT_OFF_S", put_off_s)

        @cli._errors
        def export(out):
            __import__(name)
            time.sleep(60)

        started = time.monotonic()
        with pytest.raises(click.ClickException) as caught:
            export(out="x")
        took = time.monotonic() - started
        assert caught.value.exit_code == 128 + sig and took < 30, (name, caught.value.exit_code, f"{took:.1f} s")
        assert (name in sys.modules and sys.modules[name].DONE) if name == "slow_import" else name not in sys.modules
        sys.modules.pop(name, None)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.parametrize("where", ["zarr_loop", "thread_start"])
def test_a_sigterm_as_zarr_starts_its_event_loop_thread_waits_for_the_thread(where):
    """A preempted job's SIGTERM landed as zarr made its event loop (the first store read of a process): raised between
    zarr's making the loop's thread and starting it, it left an unstarted thread in zarr's globals, and the command's
    one line was followed at exit by a traceback of zarr's clean-up ("cannot join thread before it is started"; CI, the
    requeued-job test); a caller going on in-process would wait forever on a loop that never runs. The thread's start
    runs to its end first, then the command stops with its one line and nothing after it."""
    script = f"""
import asyncio, inspect, signal, sys, threading, time
import click
import kdcache.cli as cli
import zarr.core.sync as zsync

source, first = inspect.getsourcelines(zsync._get_loop)
line = first + next(i for i, text in enumerate(source) if {"'.daemon = True'" if where == "zarr_loop" else "'.start()'"} in text)

def tracer(frame, event, arg):
    if frame.f_code is zsync._get_loop.__code__ and event == "line" and frame.f_lineno == line:
        sys.settrace(None)
        signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)
    return tracer

@cli._errors
def export(out):
    sys.settrace(tracer)
    zsync.sync(asyncio.sleep(0))
    time.sleep(60)

try:
    export(out="x")
except click.ClickException as e:
    print("exit", e.exit_code, "started", zsync.iothread[0] is not None and zsync.iothread[0].ident is not None)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env(), timeout=120)
    assert proc.stdout.split() == ["exit", "143", "started", "True"] and proc.stderr == "", (proc.stdout, proc.stderr)


@pytest.mark.parametrize("where", ["before", "after"])
def test_ctrl_c_as_click_parses_the_command_line_or_once_the_command_has_ended_is_no_aborted(where, tiny_store):
    """A Ctrl-C outside the command's own handlers (tests/fuzz_signals.py): as click parsed the command line, before the
    command installed them, or once the command had ended and put Python's handler back, Python's KeyboardInterrupt
    reached click, which said an empty line and "Aborted!", exit 1, even after a verify that had printed "every check
    holds". Before: the command's one line, exit 130; after: ignored, as SIGTERM is then, the command's own status."""
    script = f"""
import signal, sys, threading
import kdcache.cli as cli
from kdcache.__main__ import run

wrapper = cli._errors(lambda: None).__code__  # every command's wrapper: its call and return bound the command's handlers

def tracer(frame, event, arg):
    if frame.f_code is not wrapper:
        return None
    if event == {"'call'" if where == "before" else "'return'"}:
        sys.settrace(None)
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
    return tracer

sys.argv = ["kdcache", "verify", {tiny_store!r}]
sys.settrace(tracer)
run()
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env(), timeout=120)
    if where == "before":
        assert (proc.returncode, proc.stdout, proc.stderr) == (130, "", "Error: interrupted before the command started; nothing was done\n"), proc
    else:
        assert proc.returncode == 0 and proc.stderr == "" and proc.stdout.endswith("verified: every check holds\n"), proc


def stopped_at(module: str, function: str, event: str, sig: int, *args: object, timeout: float = 120) -> subprocess.CompletedProcess:
    """The kdcache program run with ``args`` in a subprocess, ``sig`` sent to it as ``module.function`` is entered
    (``event`` "call": at its first line) or returns ("return"), from a ``sys.settrace`` tracer: at that very spot."""
    script = f"""
import importlib, signal, sys, threading
from kdcache.__main__ import run

code = importlib.import_module({module!r}).{function}.__code__  # the module: kdcache.train is also the function

def tracer(frame, event, arg):
    if frame.f_code is not code:
        return None
    if event == {event!r}:
        sys.settrace(None)
        signal.pthread_kill(threading.main_thread().ident, {int(sig)})
    return tracer

sys.argv = ["kdcache", *{[str(a) for a in args]!r}]
sys.settrace(tracer)
run()
"""
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env(), timeout=timeout)


@pytest.mark.parametrize("command", ["pack", "export"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_pack_or_export_stopped_once_its_file_is_in_place_says_the_file_is_kept(command, sig, tiny_store, tmp_path):
    """A stop that landed once pack or export had renamed its file into place (as it synced the folder, said its notes
    or printed its line; tests/fuzz_signals.py) said "no file was written", and the rerun it implied was refused: the
    file was there ("exists; choose another output or pass --overwrite"). It says the file is kept, whole."""
    out = tmp_path / ("s.zarr.zip" if command == "pack" else "s.h5")
    proc = stopped_at("kdcache.interop", "_put_in_place", "return", sig, command, tiny_store, out)
    said = "interrupted" if sig == signal.SIGINT else "stopped by SIGTERM"
    assert proc.returncode == 128 + sig and proc.stderr == f"Error: {said}; {str(out)!r} was written whole before it stopped and is kept: there is nothing to run again\n", proc
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # its temporary file renamed, nothing else
    if command == "pack":  # the same zip as an uninterrupted pack's
        assert invoke("pack", tiny_store, tmp_path / "whole.zarr.zip").exit_code == 0
        with zipfile.ZipFile(out) as got, zipfile.ZipFile(tmp_path / "whole.zarr.zip") as want:
            assert [(i.filename, got.read(i)) for i in got.infolist()] == [(i.filename, want.read(i)) for i in want.infolist()]
    else:  # imported back: the store's arrays
        assert invoke("import", out, tmp_path / "back.zarr").exit_code == 0
        got, want = read_store(tmp_path / "back.zarr")[1], read_store(tiny_store)[1]
        assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("command", ["pack", "export"])
def test_a_pack_or_export_stopped_before_its_file_is_in_place_says_no_file_was_written_whatever_the_earlier_files_time(command, tiny_store, tmp_path):
    """An --overwrite stopped before its file was renamed into place leaves OUT as it was. That was told from OUT's
    modification time, which a copy keeps (cp -p, rsync -a, tar x of a file from a machine whose clock runs ahead): an
    earlier file dated after the start was said to be this run's, "written whole ... nothing to run again", the stale file
    kept as the new one. It is told from the time the file last changed (ctime), which no copy sets."""
    out = tmp_path / ("s.zarr.zip" if command == "pack" else "s.h5")
    assert invoke(command, tiny_store, out).exit_code == 0
    earlier = out.read_bytes()
    later = time.time() + 3600
    os.utime(out, (later, later))  # as a copy from a machine an hour ahead leaves it
    proc = stopped_at("kdcache.interop", "_put_in_place", "call", signal.SIGINT, command, tiny_store, out, "--overwrite")  # before the rename
    assert proc.returncode == 130 and proc.stderr == "Error: interrupted; no file was written\n", proc
    assert out.read_bytes() == earlier and [p.name for p in tmp_path.iterdir()] == [out.name]


def test_a_train_overwrite_stopped_before_its_first_checkpoint_says_the_earlier_run_is_kept_whatever_its_time(tiny_store, tmp_path):
    """As pack's above: a ``train --overwrite`` stopped before its first checkpoint leaves the earlier run's as it was,
    which was told from the checkpoint's modification time: a run folder copied from a machine whose clock runs ahead
    was said to hold this run's checkpoint ("its last checkpoint is kept: run it again with --resume"), the earlier
    run's taken for the new one. Told from its ctime, which no copy sets."""
    out = tmp_path / "run"
    args = ["train", str(TINY_TOML), "--cache", tiny_store, "--out", str(out), "--epochs", "1", "--no-progress", *PLAIN]
    assert invoke(*args).exit_code == 0
    checkpoint = out / "checkpoint.pt"
    earlier, later = checkpoint.read_bytes(), time.time() + 3600
    os.utime(checkpoint, (later, later))  # as a copy from a machine an hour ahead leaves it
    proc = stopped_at("kdcache.train", "_epochs", "call", signal.SIGINT, *args, "--overwrite", timeout=300)  # no checkpoint yet
    assert proc.returncode == 130 and len(proc.stderr.splitlines()) == 1, proc
    assert "still holds the earlier run, unchanged: run the same command again to start afresh" in proc.stderr, proc.stderr
    assert checkpoint.read_bytes() == earlier


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
@pytest.mark.parametrize("nth", [1, 3, 10])
def test_a_stop_as_hdf5_writes_an_export_through_its_file_object_waits_for_the_write(sig, nth, tiny_store, tmp_path):
    """A SIGTERM or Ctrl-C landing in a write HDF5 makes through export's file object (``interop._Sink``, called back
    from HDF5's C code; tests/fuzz_signals.py: export:TERM:0.256) raised there: h5py swallowed it and printed its
    traceback, export said "exported 7 arrays into OUT", and the process crashed as HDF5 closed the file (SIGSEGV, exit
    -11). The write runs to its end first: the export then stops with its one line, or, ended meanwhile, exits 0 with
    its file whole."""
    out = tmp_path / "s.h5"
    script = f"""
import signal, sys, threading
import kdcache.interop as interop
from kdcache.__main__ import run

seen = [0]

def tracer(frame, event, arg):
    if event == "call" and frame.f_code is interop._Sink.write.__code__:
        seen[0] += 1
        if seen[0] == {nth}:
            sys.settrace(None)
            signal.pthread_kill(threading.main_thread().ident, {int(sig)})
    return None

sys.argv = ["kdcache", "export", {tiny_store!r}, {str(out)!r}]
sys.settrace(tracer)
run()
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env(), timeout=120)
    said = "interrupted" if sig == signal.SIGINT else "stopped by SIGTERM"
    assert proc.returncode in (0, 128 + sig) and "Traceback" not in proc.stderr, proc
    if proc.returncode == 0:
        assert proc.stderr == "" and invoke("import", out, tmp_path / "back.zarr").exit_code == 0
        got, want = read_store(tmp_path / "back.zarr")[1], read_store(tiny_store)[1]
        assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
    else:
        assert proc.stderr.startswith(f"Error: {said}; ") and len(proc.stderr.splitlines()) == 1, proc.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_stop_in_hdf5_s_write_callback_waits_however_long_the_write_takes(sig, tiny_store, tmp_path):
    """A signal put off in an import or a finalizer is raised after ``cli.PUT_OFF_S`` (a hung import is cut short); one
    in HDF5's write callback (``interop._Sink``) was too: raised there, h5py dropped it and the export ran to its end,
    exit 0, the stop lost (or the process crashed as HDF5 closed the file). While one h5py call writes a large
    dataset, Python runs only in that callback, so every resend lands there: past the limit (0 here, with writes
    slowed to 20 ms, a slow disk's) the signal is still put off: it stops the export between two of HDF5's calls, or,
    the file written meanwhile, comes after the export's end (its file whole, as a put-off signal can)."""
    out = tmp_path / "s.h5"
    script = f"""
import signal, sys, threading, time
import kdcache.cli as cli
import kdcache.interop as interop
from kdcache.__main__ import run

cli.PUT_OFF_S = 0.0
made, seen = interop._Sink.__init__, [0]

class SlowFile:  # the file _Sink writes to, on a slow disk: each write 20 ms, the signal sent in the second
    def __init__(self, file):
        self.file = file

    def write(self, data):
        seen[0] += 1
        if seen[0] == 2:
            signal.pthread_kill(threading.main_thread().ident, {int(sig)})
        time.sleep(0.02)
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)

def slow_sink(self, fd):
    made(self, fd)
    self.file = SlowFile(self.file)

interop._Sink.__init__ = slow_sink
sys.argv = ["kdcache", "export", {tiny_store!r}, {str(out)!r}]
run()
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env(), timeout=120)
    said = "interrupted" if sig == signal.SIGINT else "stopped by SIGTERM"
    assert proc.returncode in (0, 128 + sig) and "Traceback" not in proc.stderr, proc  # old: -11, h5py's traceback
    if proc.returncode == 0:  # HDF5 writes its file as it closes it: ended before the signal came again, the file whole
        assert proc.stderr == "" and invoke("import", out, tmp_path / "back.zarr").exit_code == 0
    else:
        assert proc.stderr.startswith(f"Error: {said}; ") and len(proc.stderr.splitlines()) == 1, proc.stderr
        # stopped once its file was renamed into place (the resend landing after the write, on a loaded machine): kept whole
        kept = "was written whole before it stopped and is kept" in proc.stderr
        assert out.exists() == kept and not list(tmp_path.glob("*.part*")), (proc.stderr, sorted(tmp_path.iterdir()))
        assert not kept or invoke("import", out, tmp_path / "back.zarr").exit_code == 0


def test_a_sigterm_put_off_in_an_import_reaches_the_handler_train_installs_after_it(tmp_path, monkeypatch):
    """A preempted job's SIGTERM as train was set up landed in an import and was put off; once the import ended train had
    installed its own SIGTERM handler (it saves a checkpoint first), and the signal, sent again only while kdcache's own
    handler was the one installed, was lost: the job ran to its end, exit 0. It reaches train's handler now."""
    import kdcache.cli as cli

    (tmp_path / "setup_import.py").write_text("import signal, threading, time\n"
                                              "signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)\n"
                                              "time.sleep(0.2)  # the handler runs here, in the import\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    taken = []

    @cli._errors
    def export(out):
        __import__("setup_import")
        before = signal.signal(signal.SIGTERM, lambda signum, frame: taken.append(signum))  # as train._stop_requests
        try:
            deadline = time.monotonic() + 5
            while not taken and time.monotonic() < deadline:
                time.sleep(0.02)
        finally:
            signal.signal(signal.SIGTERM, before)

    try:
        export(out="x")
    finally:
        sys.modules.pop("setup_import", None)
    assert taken == [signal.SIGTERM]


def test_a_signal_put_off_in_a_command_that_ended_does_not_cut_the_next_command_s_wait_short(tmp_path, monkeypatch):
    """A SIGTERM put off in an import (or a finalizer) kept its first put-off time when the command ended before the
    signal was sent again; a later command in the same process (a caller of kdcache.cli.main, CliRunner) counted its own
    put-off signal from that time, past ``cli.PUT_OFF_S``, and raised it at once inside its import (the import left half
    made). Each command starts afresh, and leaves the process's handlers and hooks as it found them."""
    import kdcache.cli as cli

    for name, wait in (("first_import", 0.2), ("second_import", 0.3)):
        (tmp_path / f"{name}.py").write_text("import signal, threading, time\n"
                                             "signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)\n"
                                             f"time.sleep({wait})  # the handler runs here, in the import\nDONE = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cli, "PUT_OFF_S", 3.0)
    found = (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT), sys.excepthook, sys.unraisablehook)

    @cli._errors
    def export(out):
        __import__(out)
        if out == "second_import":
            time.sleep(60)  # stopped here, once the import has ended

    switch = sys.getswitchinterval()
    sys.setswitchinterval(30)  # the thread that sends the signal again waits for the GIL until the first command has ended
    try:
        export(out="first_import")  # ends as its import does: the signal put off there is not sent again
    finally:
        sys.setswitchinterval(switch)
    try:
        assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT), sys.excepthook, sys.unraisablehook) == found
        time.sleep(3.0)  # the first command's put-off began PUT_OFF_S ago
        started = time.monotonic()
        with pytest.raises(click.ClickException) as caught:
            export(out="second_import")
        assert caught.value.exit_code == 143 and time.monotonic() - started < 30
        assert "second_import" in sys.modules and sys.modules["second_import"].DONE, "the import was cut short"
        assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT), sys.excepthook, sys.unraisablehook) == found
    finally:
        sys.modules.pop("first_import", None)
        sys.modules.pop("second_import", None)


def test_a_command_run_after_the_kdcache_program_in_one_process_gives_the_caller_s_sigterm_handler_back(tmp_path, monkeypatch):
    """``kdcache.cli.main()`` run as the program (the process's arguments), its SystemExit caught in-process, left
    ``cli._PROGRAM`` set: a command run after it through its own ``main`` (not the group's, which sets it again) took it
    for the program and left SIGTERM ignored where it gives the caller's handler back."""
    import kdcache.cli as cli

    def mine(signum, frame):
        pass

    before = signal.signal(signal.SIGTERM, mine)
    try:
        monkeypatch.setattr(sys, "argv", ["kdcache", "--version"])
        with pytest.raises(SystemExit) as ended:
            main()
        assert ended.value.code == 0 and signal.getsignal(signal.SIGTERM) is mine
        with pytest.raises(click.ClickException, match="^no store at "):
            main.commands["info"].main([str(tmp_path / "none.zarr")], standalone_mode=False)
        assert signal.getsignal(signal.SIGTERM) is mine and not cli._PROGRAM
    finally:
        signal.signal(signal.SIGTERM, before)


@pytest.mark.parametrize("finalizer", ["__del__", "weakref callback", "generator finally"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signal_that_lands_in_a_finalizer_still_stops_the_command(sig, finalizer, capfd):
    """Ctrl-C or SIGTERM while a finalizer runs in the main thread (CI: a dask Future collected in a --workers extract's
    driver): Python drops an exception raised in a ``__del__`` ("Exception ignored in"), so the command went on to its
    end and exited 0. The signal is taken once the finalizer is done, and the command stops with its one line. So too
    in the finalizers a look at the stack does not tell (a weakref's callback: a dask Comm leaving the WeakSet that
    lists it; a generator's ``finally`` as it is collected), which went on to the end, "Exception ignored in" and a
    traceback printed; there the finalizer is cut short and the signal taken just after."""
    import weakref

    import kdcache.cli as cli

    ran = []

    def land() -> None:
        signal.pthread_kill(threading.main_thread().ident, sig)
        time.sleep(0.05)  # the handler runs here, in the finalizer
        ran.append("finalized")

    class Collected:
        def __del__(self):
            land()

    class Referent:
        pass

    def generator():
        try:
            yield
        finally:
            land()

    refs = []

    def collect() -> None:  # each collected at once
        if finalizer == "__del__":
            Collected()
        elif finalizer == "weakref callback":
            refs.append(weakref.ref(Referent(), lambda _: land()))  # the weakref outlives its referent
        else:
            next(generator())  # closed as it is collected, suspended inside its try

    @cli._errors
    def export(out):  # any command: an export's interruption says "no file was written"
        collect()
        for _ in range(100):
            time.sleep(0.05)
        ran.append("went on to the end")

    hook = sys.unraisablehook
    with pytest.raises(click.ClickException) as caught:
        export(out="x")
    assert ran == (["finalized"] if finalizer == "__del__" else [])
    assert caught.value.exit_code == 128 + sig
    assert caught.value.message == ("interrupted" if sig == signal.SIGINT else "stopped by SIGTERM") + "; no file was written"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler and sys.unraisablehook is hook
    assert "Exception ignored" not in capfd.readouterr().err


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads the main thread's state in /proc")
def test_train_ctrl_c_while_it_waits_for_a_checkpoint_write_says_what_is_kept(trained, tmp_path):
    """A checkpoint write slower than the next epoch (its temp file a FIFO: a slow disk whose pace the test sets): the run
    waits for it, and a Ctrl-C there ends the run with a line that is true of OUT and a rerun that reaches the
    uninterrupted weights (was: the wait forgot the write, train raised with it under way, the CLI said 'no checkpoint
    was saved' and the checkpoint landed after, as the process exited)."""
    out = tmp_path / "run"
    out.mkdir()
    os.mkfifo(out / "checkpoint.pt.tmp")
    args = ["train", TINY_TOML, "--cache", trained["store"], "--out", out, "--epochs", TRAIN_EPOCHS, *PLAIN, "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-m", "kdcache.cli", *map(str, args)], env=env(), stderr=subprocess.PIPE, text=True)
    drained: list[bytes] = []
    try:
        deadline = time.monotonic() + 240
        while not (out / "metrics.jsonl").exists() and time.monotonic() < deadline:  # epoch 0's write began: its line first
            time.sleep(0.02)
        waiting(proc.pid)  # that write is stuck opening the FIFO, and the run waits for it after epoch 1
        proc.send_signal(signal.SIGINT)
        reader = threading.Thread(target=lambda: drained.append((out / "checkpoint.pt.tmp").read_bytes()))
        reader.start()  # the disk moves on
        assert proc.wait(timeout=60) == 130
    finally:
        proc.kill()
    reader.join(timeout=60)
    stderr = proc.stderr.read()
    if (out / "checkpoint.pt").exists():  # the FIFO renamed into place: the bytes a slow disk would have kept
        (out / "checkpoint.pt").unlink()
        (out / "checkpoint.pt").write_bytes(drained[0])
        assert_one_line_error(stderr, "Error: interrupted; its last checkpoint is kept: run it again with --resume to continue")
        again = ["--resume"]
    else:
        assert_one_line_error(stderr, "Error: interrupted; no checkpoint was saved: run the same command again")
        again = []
    result = invoke(*args, *again)
    assert result.exit_code == 0, result.output
    assert_same_training(out, trained["reference"])


@pytest.mark.slow
def test_a_job_preempted_at_random_moments_and_requeued_reaches_the_uninterrupted_weights(tiny_store, tmp_path):
    """A preemptible job: the same `kdcache train … --auto-resume` command, SIGTERMed by wall clock at seeded random
    moments (while Python starts, while the run is set up, inside and between epochs, while it evaluates or saves,
    after the last step), run again until it exits 0, reaches the weights and per-epoch losses of one uninterrupted
    run (a dropout student: the RNG is restored wherever it stopped).

    The first three stops that land (exit 143) are drawn from Python's start to a quarter of the whole run's time
    after it, both measured here: together they do at most three quarters of the work, so they land on a fast machine
    too (drawn from a fixed 1-5 s, a CI machine once finished after two; a loaded box whose load went once the whole run
    was timed finished after one: the job then starts over, its first stops drawn from half that window). The next two anywhere in 1-5 s, the end of
    the run included; then it runs to its end (each try pays Python's start and the run's setup again: left to
    chance, a loaded machine took 15 tries)."""
    args = ["train", TINY_TOML, "--cache", tiny_store, "--epochs", "80", "--batch-size", "2", "--set", "train.checkpoint_every=9", "--set",
            f"student.factory='{FIXTURES}/bad_input.py:dropping'", "--set", "train.features={}", "--no-progress"]
    started = time.perf_counter()
    whole = invoke(*args, "--out", tmp_path / "whole")
    assert whole.exit_code == 0, whole.output
    run_s, started = time.perf_counter() - started, time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch, kdcache.cli"], env=env(), check=True)
    start_s = time.perf_counter() - started
    out, rng, ends, late, window = tmp_path / "preempted", random.Random(21), Counter(), 0, start_s + run_s / 4
    for attempt in range(40):
        proc = subprocess.Popen([sys.executable, "-m", "kdcache.cli", *map(str, args), "--out", str(out), "--auto-resume"],
                                env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if ends[143] < 3:
            wait = rng.uniform(0.3, window)  # lands while work is left
        elif late < 2:
            wait, late = rng.uniform(1.0, 5.0), late + 1
        else:
            wait = 120.0  # to its end
        try:
            returncode = proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            returncode = proc.wait(timeout=60)
        stderr = proc.stderr.read()
        ends[returncode] += 1
        # 143: stopped with its one line; -15: SIGTERM before kdcache's handler was installed (Python starting)
        assert returncode in (0, 143, -signal.SIGTERM), f"attempt {attempt}: {returncode}: {stderr[-2000:]}"
        assert returncode != 143 or (len(stderr.strip().splitlines()) == 1 and stderr.startswith("Error: stopped by SIGTERM")), stderr
        if returncode == 0 and ends[143] < 3:  # the machine sped up since run_s was measured (a loaded box's load
            shutil.rmtree(out)  # went): the job again from its start, its first stops drawn sooner
            ends, late, window = Counter(), 0, max(window / 2, start_s)
        elif returncode == 0:
            break
    assert returncode == 0 and ends[143] >= 3, ends  # several stops landed, and the job ended
    for name in ("student.pt", "heads.pt"):
        a, b = (torch.load(run / name, weights_only=True) for run in (out, tmp_path / "whole"))
        assert all(torch.equal(a[k], b[k]) for k in b), name
    lines = [[json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()] for run in (out, tmp_path / "whole")]
    assert [m["epoch"] for m in lines[0]] == list(range(80))
    assert [m["loss"] for m in lines[0]] == [m["loss"] for m in lines[1]]
    assert [m["eval_accuracy"] for m in lines[0]] == [m["eval_accuracy"] for m in lines[1]]


# ------------------------------------------------------------------------------ 2. concurrent readers


def test_readers_during_an_extract_see_only_completed_shards(tmp_path, zoo_env):
    """info, verify and train --allow-partial run in a loop while a real kdcache process writes the store. The writer
    is held at its last shard's first item until the readers have had their rounds (3 of info, 1 of train): a loaded
    box's readers are slow, and the writer (2 s) could end before them."""
    toml = write_toml(tmp_path / "p.toml", "extract.rows_per_shard=8", "extract.batch_size=4")
    out, hold = tmp_path / "live.zarr", tmp_path / "hold"
    n = 160
    zoo_env(N=n)  # this process' readers build the same dataset (train fetches inputs)
    hold.touch()
    writer = subprocess.Popen([sys.executable, "-m", "kdcache.cli", "extract", str(toml), "--out", str(out), "--no-progress"],
                              env=env(ZOO_N=n, ZOO_SLEEP=0.012, ZOO_HOLD=hold, ZOO_HOLD_AT=n - 8), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    seen: list[int] = []
    rounds = Counter()
    try:
        deadline = time.monotonic() + 120
        while not (out / "zarr.json").exists() or "kdcache" not in (out / "zarr.json").read_text():
            assert writer.poll() is None and time.monotonic() < deadline, writer.stderr.read().decode()
            time.sleep(0.01)
        i = 0
        while writer.poll() is None and time.monotonic() < deadline:
            i += 1
            result = invoke("info", out, "--json")
            assert result.exit_code == 0 and result.exception is None, result.output
            info = json.loads(result.stdout)
            assert info["samples_done"] == 8 * info["shards_done"] and (info["complete"] is (info["shards_done"] == n // 8))
            seen.append(info["shards_done"])
            rounds["info"] += 1

            result = invoke("verify", out, "--json")
            assert result.exception is None or isinstance(result.exception, SystemExit), result.output
            assert "Traceback" not in result.output
            report = json.loads(result.stdout)
            bad = [c for c in report["checks"] if not c["ok"] and c["name"] != "completeness"]
            assert not bad, bad  # done shards are always whole: layout, checksums and values hold
            rounds["verify"] += 1

            if i % 3 == 1:
                result = invoke("train", toml, "--cache", out, "--out", tmp_path / "student", "--allow-partial", "--overwrite",
                                "--set", "train.steps=2", "--set", "train.epochs=1", *STUDENT, "--no-progress")
                if result.exit_code != 0:  # only before the first shard is done
                    assert_one_line_error(result.output, "has no completed shard yet")
                else:
                    rounds["train"] += 1
            if rounds["info"] >= 3 and rounds["train"] >= 1 and hold.exists():
                hold.unlink()  # the writer ends while the readers go on
        assert writer.wait(timeout=60) == 0, writer.stderr.read().decode()
    finally:
        hold.unlink(missing_ok=True)
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    assert seen == sorted(seen), "shards done never decrease"
    assert rounds["info"] >= 3 and rounds["train"] >= 1 and 0 < len(set(seen)), (rounds, seen)
    assert open_store(out).complete and invoke("verify", out).exit_code == 0


# ------------------------------------------------------------------------------ 3. disk full


def first_event(events: list[tuple[int, str, str]], kind: str, contains: str) -> int:
    return next(n for n, k, p in events if k == kind and contains in p)


@pytest.mark.parametrize("moment", ["shard data", "done flag", "final manifest"])
def test_extract_on_a_full_disk_fails_with_one_line_and_resumes(zoo, tmp_path, moment):
    """Portable variant: OSError(ENOSPC) injected from one write on (every later write fails too)."""
    events = zoo["events"]
    n = {"shard data": first_event(events, "write", "targets/layers/conv/c/2"),
         "done flag": next(n for n, k, p in events if k == "write" and "progress/done/c/" in p and shard_of(p) == 1),  # its file or its temp
         "final manifest": [e for e in events if e[2] == "reference.zarr/zarr.UUID.partial" and e[1] == "write"][-1][0]}[moment]
    out = tmp_path / "reference.zarr"
    f = faults.install("enospc", n, None, str(tmp_path))
    try:
        result = invoke("extract", zoo["toml"], "--out", out, "--no-progress")
    finally:
        f.uninstall()
    assert result.exit_code == 1, result.output
    assert_one_line_error(result.output, "No space left on device", str(out), "free space and rerun the same command to resume")
    store = open_store(out)
    done = store.done()
    assert {"shard data": 2, "done flag": 1, "final manifest": 4}[moment] == done.sum(), done
    assert not temp_files(out), "a failed write leaves no temp file behind"
    ref = file_bytes(zoo["reference"])
    for key, data in file_bytes(out).items():  # what was written before the failure is intact
        if "/c/" in key and (key.startswith("progress") or done[shard_of(key)]):
            assert data == ref[key], key

    result = invoke("extract", zoo["toml"], "--out", out, "--no-progress")  # space freed: the same command resumes
    assert result.exit_code == 0, result.output
    assert_same_store(out, zoo["reference"])


def namespace_runner() -> list[str] | None:
    """How to run a script that mounts a tmpfs in a private mount namespace (gone when it exits), or None."""
    if not sys.platform.startswith("linux") or not shutil.which("unshare"):
        return None
    prefix = ["unshare", "-m"] if os.geteuid() == 0 else ["unshare", "-rm"]
    probe = subprocess.run([*prefix, "sh", "-c", "d=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs $d && umount $d; r=$?; rmdir $d; exit $r"],
                           capture_output=True)
    return prefix if probe.returncode == 0 else None


TMPFS_SCRIPT = r"""
set -u
mount -t tmpfs -o size="$SMALL" tmpfs "$MNT"
"$@" > "$OUT/stdout1" 2> "$OUT/stderr1"; echo $? > "$OUT/rc1"
cp -a "$MNT/." "$OUT/after-failure"
mount -o remount,size=64m tmpfs "$MNT"       # space freed
"$@" $RESUME > "$OUT/stdout2" 2> "$OUT/stderr2"; echo $? > "$OUT/rc2"
cp -a "$MNT/." "$OUT/resumed"
"""


def run_on_tmpfs(tmp_path: Path, size: str, command: list[object], resume: str = "") -> Path:
    prefix = namespace_runner()
    if prefix is None:
        pytest.skip("cannot mount a tmpfs here: needs Linux with unshare and mount namespaces (root, or unprivileged user namespaces)")
    mnt, out = tmp_path / "mnt", tmp_path / "result"
    mnt.mkdir(), out.mkdir()
    script = tmp_path / "disk-full.sh"
    script.write_text(TMPFS_SCRIPT)
    proc = subprocess.run([*prefix, "bash", str(script), *map(str, command)], capture_output=True, timeout=240,
                          env=env(SMALL=size, MNT=mnt, OUT=out, RESUME=resume, ZOO_N=400))
    assert proc.returncode == 0, proc.stderr.decode()
    assert not any(mnt.iterdir()), "the tmpfs stayed private to its namespace"
    return out


def test_extract_on_a_real_full_tmpfs_fails_with_one_line_and_resumes(tmp_path, zoo_env):
    """A real tmpfs of 160 KiB (pages of 4 KiB: the metadata and a few shards fit, 25 shards do not)."""
    toml = write_toml(tmp_path / "p.toml", "extract.rows_per_shard=16")
    zoo_env(N=400)
    assert invoke("extract", toml, "--out", tmp_path / "reference.zarr").exit_code == 0
    out = run_on_tmpfs(tmp_path, "160k", [sys.executable, "-m", "kdcache.cli", "extract", toml, "--out", tmp_path / "mnt" / "s.zarr", "--no-progress"])
    assert (out / "rc1").read_text().strip() == "1"
    assert_one_line_error((out / "stderr1").read_text(), "No space left on device", "free space and rerun the same command to resume")
    partial = out / "after-failure" / "s.zarr"
    done = open_store(partial).done()
    assert 0 < done.sum() < len(done), done
    ref = file_bytes(tmp_path / "reference.zarr")
    for key, data in file_bytes(partial).items():
        if "/c/" in key and not key.startswith("progress") and done[shard_of(key)]:
            assert data == ref[key], key
    assert not temp_files(partial)
    assert (out / "rc2").read_text().strip() == "0", (out / "stderr2").read_text()
    assert_same_store(out / "resumed" / "s.zarr", tmp_path / "reference.zarr")


def checkpoint_size(tiny_store: str, tmp_path: Path) -> int:
    run = tmp_path / "probe"
    assert invoke("train", TINY_TOML, "--cache", tiny_store, "--out", run, "--epochs", 1, *PLAIN, "--no-progress").exit_code == 0
    return (run / "checkpoint.pt").stat().st_size


def test_train_on_a_real_full_tmpfs_keeps_the_last_checkpoint_and_resumes(trained, tmp_path):
    """Room for one checkpoint but not for a second beside it: epoch 2's checkpoint cannot be written."""
    pages = lambda n: -(-n // 4096) * 4  # noqa: E731 - KiB in whole tmpfs pages
    size = 3 * 4 + pages(checkpoint_size(trained["store"], tmp_path)) * 3 // 2
    args = [sys.executable, "-m", "kdcache.cli", "train", TINY_TOML, "--cache", trained["store"], "--out", tmp_path / "mnt" / "run",
            "--epochs", TRAIN_EPOCHS, *PLAIN, "--no-progress"]
    out = run_on_tmpfs(tmp_path, f"{size}k", args, resume="--resume")
    assert (out / "rc1").read_text().strip() == "1"
    assert_one_line_error((out / "stderr1").read_text(), "No space left on device", "checkpoint.pt", "--resume")
    ckpt = torch.load(out / "after-failure" / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 1, "the last checkpoint is intact"
    assert not [p.name for p in (out / "after-failure" / "run").iterdir() if p.name.endswith(".tmp")]
    assert (out / "rc2").read_text().strip() == "0", (out / "stderr2").read_text()
    assert_same_training(out / "resumed" / "run", trained["reference"])


@pytest.mark.parametrize("moment", ["checkpoint", "final weights"])
def test_train_on_a_full_disk_fails_with_one_line_and_resumes(trained, tmp_path, moment):
    """Portable variant: ENOSPC injected at the second checkpoint's write, or at the final student.pt."""
    events = trained["events"]
    n = [e for e in events if e[1] == "write" and "checkpoint.pt" in e[2]][1][0] if moment == "checkpoint" else \
        first_event(events, "write", "student.pt")
    out = tmp_path / "reference"
    args = ["train", TINY_TOML, "--cache", trained["store"], "--out", out, "--epochs", TRAIN_EPOCHS, *PLAIN, "--no-progress"]
    f = faults.install("enospc", n, None, str(tmp_path))
    try:
        result = invoke(*args)
    finally:
        f.uninstall()
    assert result.exit_code == 1, result.output
    assert_one_line_error(result.output, "No space left on device", str(out), "--resume")
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == (1 if moment == "checkpoint" else TRAIN_EPOCHS), "the last checkpoint is intact"
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    result = invoke(*args, "--resume")
    assert result.exit_code == 0, result.output
    assert_same_training(out, trained["reference"])


def on_a_full_disk_from(n: int, root: Path, *args: object):
    """``kdcache ARGS`` in this process, its checkpoints written in their thread, every write from event ``n`` on failing
    with ENOSPC; returns the CliRunner result."""
    f = faults.install("enospc", n, None, str(root), background=True)
    try:
        return invoke(*args)
    finally:
        f.uninstall()


def test_train_with_background_writes_on_a_full_disk_fails_with_one_line_and_resumes(trained, tmp_path):
    """As above with the checkpoints written in their thread, as a real run writes them (the fault fixture's default is
    the main thread): ENOSPC from epoch 1's checkpoint on (its metrics line may fail first, as the steps of epoch 2 run
    meanwhile). The run ends with the write's one line, epoch 0's checkpoint is whole, and --resume reaches the
    uninterrupted weights."""
    n = [e for e in trained["events"] if e[1] == "write" and "checkpoint.pt" in e[2]][1][0]
    out = tmp_path / "reference"
    args = ["train", TINY_TOML, "--cache", trained["store"], "--out", out, "--epochs", TRAIN_EPOCHS, *PLAIN, "--no-progress"]
    result = on_a_full_disk_from(n, tmp_path, *args)
    assert result.exit_code == 1, result.output
    assert_one_line_error(result.output, "No space left on device", str(out), "--resume to continue from the last checkpoint")
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1, "the last checkpoint is intact"
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    result = invoke(*args, "--resume")
    assert result.exit_code == 0, result.output
    assert_same_training(out, trained["reference"])


def test_a_last_background_write_failing_names_no_error_its_caller_was_handling(trained, tmp_path):
    """The last epoch's checkpoint fails in its thread (ENOSPC) as the run ends normally, train having been called while
    its caller handled an error of its own: the write's line names no end of the run (was: the caller's error, read
    from sys.exc_info(), named as the error the run was ending with)."""
    n = [e for e in trained["events"] if e[1] == "write" and "checkpoint.pt" in e[2]][-1][0]
    out = tmp_path / "run"
    try:
        raise LookupError("the caller's own")
    except LookupError:
        result = on_a_full_disk_from(n, tmp_path, "train", TINY_TOML, "--cache", trained["store"], "--out", out,
                                     "--epochs", TRAIN_EPOCHS, *PLAIN, "--no-progress")
    assert result.exit_code == 1, result.output
    assert_one_line_error(result.output, "No space left on device", str(out), "--resume to continue from the last checkpoint")
    assert "was ending already" not in result.output


@pytest.mark.parametrize("ending", ["nan", "ctrl-c"])
def test_a_background_write_failing_as_the_run_ends_otherwise_is_the_error_said(trained, tmp_path, monkeypatch, ending):
    """Epoch 0's checkpoint fails in its thread (ENOSPC) while epoch 1 ends the run otherwise (its loss NaN, a Ctrl-C):
    the write's error is the line said, which names what the disk keeps and how to go on, and it names the run's own
    end too (was: the write's line alone, the NaN or Ctrl-C lost; a NaN message would have called the failed checkpoint
    kept)."""
    from kdcache.train import Run

    n = [e for e in trained["events"] if e[1] == "write" and "checkpoint.pt" in e[2]][0][0]
    calls, losses = iter(range(1, 10**9)), Run.losses

    def ends_in_epoch_1(self, batch):  # 7 steps an epoch: step 8 is epoch 1's first
        parts, call = losses(self, batch), next(calls)
        if call == 8 and ending == "ctrl-c":
            raise KeyboardInterrupt
        return {k: v * float("nan") for k, v in parts.items()} if call == 8 else parts

    monkeypatch.setattr(Run, "losses", ends_in_epoch_1)
    out = tmp_path / "reference"
    result = on_a_full_disk_from(n, tmp_path, "train", TINY_TOML, "--cache", trained["store"], "--out", out, "--epochs", TRAIN_EPOCHS,
                                 *PLAIN, "--no-progress")
    assert result.exit_code == 1, result.output
    said = {"nan": "(the run was ending already: training diverged in epoch 1: ", "ctrl-c": "(the run was ending already: interrupted)"}
    assert_one_line_error(result.output, "No space left on device", str(out), said[ending])
    assert not (out / "checkpoint.pt").exists() and not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_a_background_write_failing_as_a_dataloader_worker_s_error_ends_the_run_names_that_error_s_own_message(
        trained, tmp_path, monkeypatch):
    """Epoch 0's checkpoint fails in its thread (ENOSPC) while a DataLoader worker's read of epoch 1 raises: the write's
    line names the worker's own message (was: torch's "Caught DataError in DataLoader worker process 1." and the worker's
    traceback, up to the first "; " in it)."""
    from kdcache.train import Run

    n = [e for e in trained["events"] if e[1] == "write" and "checkpoint.pt" in e[2]][0][0]
    flag, calls, losses = tmp_path / "unmounted", iter(range(1, 10**9)), Run.losses
    monkeypatch.setenv("KDCACHE_TEST_FLAG", str(flag))

    def unmounted_after_epoch_0(self, batch):  # 7 steps an epoch: epoch 1's batches are read after step 7
        parts = losses(self, batch)
        if next(calls) == 7:
            flag.touch()
        return parts

    monkeypatch.setattr(Run, "losses", unmounted_after_epoch_0)
    out = tmp_path / "run"
    result = on_a_full_disk_from(n, tmp_path, "train", TINY_TOML, "--cache", trained["store"], "--out", out, "--epochs", TRAIN_EPOCHS,
                                 *PLAIN, "--set", "train.num_workers=2", "--set", "data.factory='bad_input.py:raising_once_flagged'",
                                 "--no-progress")
    assert result.exit_code == 1, result.output
    assert_one_line_error(result.output, "No space left on device", str(out), "(the run was ending already: the dataset raised "
                          "OSError: share unmounted reading image ")
    assert "Caught" not in result.output and "Original Traceback" not in result.output, result.output


def recorded_disk_order(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, ...]]:
    """Every ``os.fsync`` (as ``("sync", the path its fd has open)``) and ``os.replace`` (``("rename", src, dst)``), real
    paths, in the order they are done, from every thread: the real calls, recorded once each returns."""
    events: list[tuple[str, ...]] = []
    lock = threading.Lock()
    fsync, replace = os.fsync, os.replace

    def synced(fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        fsync(fd)
        with lock:
            events.append(("sync", path))

    def replaced(src: object, dst: object, *args: object, **kwargs: object) -> None:
        names = os.path.realpath(src), os.path.realpath(dst)
        replace(src, dst, *args, **kwargs)
        with lock:
            events.append(("rename", *names))

    monkeypatch.setattr(os, "fsync", synced)
    monkeypatch.setattr(os, "replace", replaced)
    return events


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names an fsync'd file through /proc")
def test_every_file_reaches_the_disk_before_it_is_renamed_into_place(tmp_path, monkeypatch, zoo_env):
    """A power loss or an OS crash keeps a rename and the renamed file's bytes in no order of their own: a done flag could
    outlive its shard's bytes, a checkpoint be renamed over the last one empty. Every file kdcache renames into place (shard
    objects, done flags, zarr's metadata and the manifest, train's files, pack's zip, export's HDF5) is fsynced first; the
    folders whose names must last are fsynced after (the manifest's, the run's after each of its files, pack's and export's)."""
    pytest.importorskip("h5py")
    from conftest import extract_tiny
    from kdcache.interop import export_hdf5, pack

    root = Path(os.path.realpath(tmp_path))
    events = recorded_disk_order(monkeypatch)
    store = extract_tiny(root / "s.zarr")
    run = root / "run"
    result = invoke("train", TINY_TOML, "--cache", store, "--out", run, "--epochs", 2, *PLAIN, "--no-progress")
    assert result.exit_code == 0, result.output
    pack(store, root / "s.zarr.zip")
    export_hdf5(store, root / "s.h5")

    renames = [(i, Path(e[2]), e[1]) for i, e in enumerate(events) if e[0] == "rename"]
    synced: dict[str, list[int]] = {}
    for i, e in enumerate(events):
        if e[0] == "sync":
            synced.setdefault(e[1], []).append(i)
    named = {str(dst.relative_to(root)) for _, dst, _ in renames}
    assert {"s.zarr/zarr.json", "s.zarr/progress/done/c/0", "s.zarr/progress/done/c/3", "s.zarr/targets/logits/c/3/0",
            "s.zarr/progress/digest/c/3/0", "run/checkpoint.pt", "run/metrics.jsonl", "run/pipeline.json", "run/student.pt",
            "s.zarr.zip", "s.h5"} <= named, sorted(named)
    for i, dst, src in renames:
        assert any(j < i for j in synced.get(src, [])), f"{dst} was renamed into place from {src} before that was fsynced"
    folders = {root / "s.zarr": "zarr.json", run: None, root: None}  # folder -> the name whose rename needs it synced after (None: any)
    for k, (i, dst, _) in enumerate(renames):
        if dst.parent in folders and folders[dst.parent] in (None, dst.name):
            following = next((j for j, d, _ in renames[k + 1:] if d.parent == dst.parent), len(events))
            assert any(i < j < following for j in synced.get(str(dst.parent), [])), f"{dst.parent} not fsynced after {dst.name} was renamed into it"
    for shard in range(4):  # 50 rows: 3 shards written whole, the last (2 rows) through zarr
        flag = max(i for i, dst, _ in renames if str(dst.relative_to(root)) == f"s.zarr/progress/done/c/{shard}")
        data = [i for i, dst, _ in renames if "/c/" in str(dst) and "progress/done" not in str(dst) and shard_of(str(dst)) == shard]
        assert data and max(data) < flag, f"shard {shard}'s done flag was renamed into place before its objects"
