"""Journeys through the surroundings teams run kdcache in, the features ordinary: a store on a read-only mount, paths
through a link or with ``~`` the shell left alone, a file size limit (``ulimit -f``), two users at once. Each sample's
values name it (``tests/fixtures/journeys.py``)."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import kdcache
from kdcache.cli import main
from kdcache.interop import pack
from kdcache.verify import verify
from reference import mount_to_make_read_only
from test_journeys import NUMBERS

REPO = Path(__file__).resolve().parents[1]

PIPELINE = NUMBERS.replace("epochs = 3", "epochs = 1")  # test_journeys' numbered samples, top-k logits and a layer


@pytest.fixture
def pipeline(tmp_path: Path) -> Path:
    path = tmp_path / "p.toml"
    path.write_text(PIPELINE)
    return path


def invoke(*args: object) -> tuple[int, str]:
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exception is None or isinstance(r.exception, SystemExit), r.output  # one line, never a traceback
    return r.exit_code, r.output


@pytest.mark.parametrize("overwrite", [False, True], ids=["fresh", "overwrite"])
def test_a_store_folder_that_is_a_link_is_written_through_the_link(tmp_path: Path, pipeline: Path, overwrite: bool):
    """``runs/t.zarr -> /scratch/t.zarr``: extract into a linked empty folder (or --overwrite a linked store) failed with
    'Cannot call rmtree on a symbolic link; fix the cause and rerun the same command to resume'; it writes the folder the
    link leads to, the link kept."""
    real = tmp_path / "scratch" / "t.zarr"
    real.mkdir(parents=True)
    link = tmp_path / "t.zarr"
    link.symlink_to(real)
    if overwrite:
        kdcache.extract(kdcache.load_pipeline(pipeline), str(real))
    code, out = invoke("extract", pipeline, "--out", link, *(["--overwrite"] if overwrite else []))
    assert code == 0, out
    assert link.is_symlink() and (real / "zarr.json").is_file()
    code, out = invoke("verify", link)
    assert code == 0 and "verified: every check holds" in out, out


@pytest.mark.parametrize("command", ["extract", "train", "info", "eval_cache"])
def test_a_tilde_the_shell_left_alone_is_refused_naming_the_home_folder(tmp_path: Path, pipeline: Path, monkeypatch: pytest.MonkeyPatch,
                                                                        command: str):
    """``--out='~/t.zarr'`` (quoted, or ``--out=~/t.zarr``, which bash does not expand) wrote a folder named ``~`` in the
    working directory, and ``info '~/t.zarr'`` said no store was there; each is refused in one line naming the path meant.
    A folder ``~`` that exists is read as meant."""
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir(), work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    store = str(tmp_path / "s.zarr")
    kdcache.extract(kdcache.load_pipeline(pipeline), store)
    args = {"extract": ["extract", pipeline, "--out", "~/t.zarr"], "info": ["info", "~/t.zarr"],
            "train": ["train", pipeline, "--cache", store, "--out", "~/run"],
            "eval_cache": ["train", pipeline, "--cache", store, "--out", "run", "--set", 'train.eval_cache="~/eval.zarr"']}[command]
    code, out = invoke(*args)
    meant = home / ("eval.zarr" if command == "eval_cache" else args[-1][2:])
    assert code == 1 and "begins with '~', which only a shell expands" in out and repr(str(meant)) in out, out
    assert list(work.iterdir()) == []
    kdcache.extract(kdcache.load_pipeline(pipeline), str(work / "~" / "t.zarr"))  # a folder of that name, made on purpose
    assert invoke("info", "~/t.zarr")[0] == 0


def test_an_out_named_with_double_colon_in_the_working_folder_is_a_folder(tmp_path: Path, pipeline: Path, monkeypatch):
    """train (and demo) took any ``NAME::`` at the start of --out for a chained URL (``zip::…``): ``--out Net::v2``, a
    folder in the working folder (one extract writes a store to, as it does ``--out tmp/Net::v2``), was refused as a
    URL, where the check's own comment said such a folder is not one. Only the chains kdcache reads are URLs: ``zip::run``
    and ``simplecache::s3://…`` are still refused, naming the URL; ``data::v2`` (a protocol of fsspec's, which no kdcache
    command reads) is a folder, as extract takes it."""
    store = tmp_path / "t.zarr"
    kdcache.extract(kdcache.load_pipeline(pipeline), str(store))
    monkeypatch.chdir(tmp_path)
    for folder in ("Net::v2", "data::v2"):  # data: one of fsspec's protocols, but no chain kdcache reads (extract writes a folder)
        code, out = invoke("train", pipeline, "--cache", store, "--out", folder)
        assert code == 0 and (tmp_path / folder / "student.pt").is_file(), out
    for url in ("zip::run", "simplecache::s3://bucket/run"):
        code, out = invoke("train", pipeline, "--cache", store, "--out", url)
        assert code == 1 and f"--out {url!r} is a URL; kdcache train writes a local folder" in out, out


def test_an_out_named_with_double_colon_is_told_without_fsspec_installed(tmp_path: Path):
    """fsspec comes with kdcache's ``remote`` extra only: telling ``--out zip::run`` (a chained URL) from ``Net::v2`` (a
    folder) imported it, a traceback where it is not installed."""
    script = ("import sys; sys.modules['fsspec'] = None\n"  # import fsspec raises ImportError, as where it is not installed
              "from kdcache.train import local_folder\n"
              "print(local_folder('Net::v2', 'train'))\n"
              "try:\n    local_folder('zip::run', 'train')\nexcept Exception as e:\n    print(type(e).__name__, e)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0 and proc.stdout.splitlines()[0] == "Net::v2", proc.stderr
    assert proc.stdout.splitlines()[1].startswith("StoreError out 'zip::run' is a URL"), proc.stdout


def test_a_training_run_inside_the_store_it_trains_from_is_refused(tmp_path: Path, pipeline: Path):
    """``train --cache t.zarr --out t.zarr/run`` trained, and the next ``extract --overwrite`` of the store deleted the
    student with the store's folder (pack left it out of the zip): refused before anything is written, as pack's and
    export's OUT inside the store are. A store inside the run's folder is fine."""
    store = tmp_path / "t.zarr"
    kdcache.extract(kdcache.load_pipeline(pipeline), str(store))
    code, out = invoke("train", pipeline, "--cache", store, "--out", store / "run")
    assert code == 1 and f"--out {str(store / 'run')!r} is inside the store {str(store)!r} being read" in out, out
    assert "extract --overwrite" in out and repr(str(tmp_path / "run")) in out and not (store / "run").exists()
    code, out = invoke("train", pipeline, "--cache", store, "--out", tmp_path)
    assert code == 0 and (tmp_path / "student.pt").is_file(), out
    code, out = invoke("train", pipeline, "--cache", store, "--out", tmp_path / "Net::v2")  # "::" inside a path: not a chained URL
    assert code == 0 and (tmp_path / "Net::v2" / "student.pt").is_file(), out


def test_a_checkpoint_past_the_file_size_limit_is_one_line_naming_the_limit_and_the_rerun_trains(tmp_path: Path, pipeline: Path):
    """A batch system's file size limit (``ulimit -f``: writes fail with EFBIG) stopped training at its first checkpoint
    with 'File too large; fix the cause and rerun'; the line names the limit, and the rerun without it trains."""
    store, out = tmp_path / "t.zarr", tmp_path / "run"
    kdcache.extract(kdcache.load_pipeline(pipeline), str(store))

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (8_000, resource.RLIM_INFINITY))  # the checkpoint is about 20 KB

    command = [sys.executable, "-m", "kdcache", "train", str(pipeline), "--cache", str(store), "--out", str(out)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run(command, capture_output=True, text=True, preexec_fn=limit, env=env, timeout=120)
    assert r.returncode == 1 and r.stderr == f"Error: cannot write {str(out / 'checkpoint.pt')!r}: File too large; lift the file " \
        "size limit (ulimit -f; or the file system's largest file, 4 GiB on FAT32) and rerun\n", (r.returncode, r.stderr)
    r = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and (out / "student.pt").is_file(), r.stderr


@pytest.mark.parametrize("workers", [[], ["--workers", "1"]], ids=["one-process", "workers"])
def test_extract_of_a_complete_store_on_a_read_only_mount_says_it_is_complete(tmp_path: Path, pipeline: Path,
                                                                             monkeypatch: pytest.MonkeyPatch, workers: list[str]):
    """A complete store on a read-only mount, extracted again with its pipeline (no --overwrite): refused for its writer
    lock ("cannot lock … Read-only file system"), though nothing was left to write; it says the store is complete (not that an
    --overwrite would redo it: the lock refuses that too). Another
    pipeline's store is refused as a resume is, and a partial store and --overwrite still for the lock."""
    with mount_to_make_read_only(tmp_path / "ro") as make_read_only:
        store, partial = tmp_path / "ro" / "t.zarr", tmp_path / "ro" / "partial.zarr"
        kdcache.extract(kdcache.load_pipeline(pipeline), str(store))
        monkeypatch.setenv("JOURNEY_FAIL_AT", "40")
        with pytest.raises(RuntimeError, match="simulated crash"):
            kdcache.extract(kdcache.load_pipeline(pipeline), str(partial))
        monkeypatch.delenv("JOURNEY_FAIL_AT")
        make_read_only()
        code, out = invoke("extract", pipeline, "--out", store, *workers)
        # no "(--overwrite to redo it)": an --overwrite cannot work where the store's folder may not be written
        assert code == 0 and out.startswith(f"{store} is already complete (96 samples); nothing to do\n"), out
        code, out = invoke("extract", pipeline, "--out", store, "--set", 'targets.dtype="float16"', *workers)
        assert code == 1 and "was made with different targets (targets.logits.dtype: store has 'float32', now 'float16')" in out, out
        for args in (["--out", partial], ["--out", store, "--overwrite"]):
            code, out = invoke("extract", pipeline, *args, *workers)
            assert code == 1 and out.startswith(f"Error: cannot lock {str(args[1])!r} for writing") and "make the folder writable" in out, out


READER = """
import json, sys
from click.testing import CliRunner
from kdcache.cli import main
from kdcache.interop import pack
from kdcache.verify import verify
results = []
for argv in json.loads(sys.argv[1]):
    r = CliRunner().invoke(main, argv)
    results.append({"argv": argv, "code": r.exit_code, "output": r.output, "traceback": r.exception is not None and not isinstance(r.exception, SystemExit)})
print(json.dumps(results))
"""


def _without_write_permission() -> list[str]:
    """The command prefix that runs a process unable to write what ``chmod a-w`` made read-only: none for a user, for
    root ``setpriv`` without the capabilities that override file permissions (skipped where there is none)."""
    if os.geteuid() != 0:
        return []
    if subprocess.run(["setpriv", "--bounding-set=-dac_override,-dac_read_search", "true"], capture_output=True).returncode != 0:
        pytest.skip("running as root, and setpriv cannot drop CAP_DAC_OVERRIDE here: chmod a-w would not stop a write")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]


def run_reader(commands: list[list[object]]) -> list[dict]:
    """Each command through the CLI in one process that cannot write a read-only folder: its exit code and output."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    argv = json.dumps([[str(a) for a in c] for c in commands])
    r = subprocess.run([*_without_write_permission(), sys.executable, "-c", READER, argv], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.slow
def test_a_store_and_its_zip_on_a_read_only_share_are_read_trained_from_and_copied_elsewhere(tmp_path: Path, pipeline: Path):
    """A team's store on a read-only share (``chmod -R a-w`` of the share: the store, its zip and the folder holding
    them): every command that only reads works (pack and export say in a note that no lock keeps writers out), the
    students train from the folder (streamed) and from the zip (in memory), and extract says in one line why it cannot
    write; nothing on the share changes."""
    share, work = tmp_path / "share", tmp_path / "work"
    share.mkdir(), work.mkdir()
    store, zipped = share / "t.zarr", share / "t.zarr.zip"
    kdcache.extract(kdcache.load_pipeline(pipeline), str(store))
    pack(str(store), str(zipped))
    before = sorted((p.relative_to(share), p.stat().st_mtime_ns) for p in share.rglob("*"))
    subprocess.run(["chmod", "-R", "a-w", str(share)], check=True)
    try:
        results = run_reader([
            ["info", store], ["verify", store], ["verify", zipped],
            ["train", pipeline, "--cache", store, "--out", work / "streamed", "--set", "train.memory_budget_mb=0"],
            ["train", pipeline, "--cache", zipped, "--out", work / "in-memory"],
            ["pack", store, work / "copy.zarr.zip"], ["extract", pipeline, "--out", store, "--overwrite"],
        ])
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(share)], check=True)
    assert not any(r["traceback"] for r in results), results
    *reads, refused = results
    assert all(r["code"] == 0 for r in reads), reads
    assert "verified: every check holds" in reads[1]["output"] and "verified: every check holds" in reads[2]["output"]
    assert "without keeping writers out" in reads[5]["output"], reads[5]
    assert refused["code"] == 1 and refused["output"].count("\n") == 1, refused
    assert refused["output"].startswith(f"Error: cannot lock {str(store)!r} for writing") and "Permission denied" in refused["output"]
    assert sorted((p.relative_to(share), p.stat().st_mtime_ns) for p in share.rglob("*")) == before
    assert (work / "streamed" / "student.pt").is_file() and (work / "in-memory" / "student.pt").is_file()
    assert verify(str(work / "copy.zarr.zip"))["ok"]


@pytest.mark.slow
def test_two_trainings_and_a_verify_of_one_store_run_at_once_and_a_second_resume_is_refused_naming_the_first(
        tmp_path: Path, pipeline: Path, monkeypatch: pytest.MonkeyPatch):
    """Two users at once: two ``train`` runs (one streaming) and a ``verify`` of one store, started together, all work
    (readers take no lock) and train as a run alone does; an ``extract`` resuming a store another resume is writing
    stops at once in one line naming the lock's holder, and the store the first finishes verifies."""
    store = tmp_path / "t.zarr"
    monkeypatch.setenv("JOURNEY_FAIL_AT", "40")
    with pytest.raises(RuntimeError, match="simulated crash"):
        kdcache.extract(kdcache.load_pipeline(pipeline), str(store))
    monkeypatch.delenv("JOURNEY_FAIL_AT")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))

    def start(*args: object, **extra: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "kdcache", *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=dict(env, **extra))

    # held at its last shard's row until the second has been refused (timed by a 2 s run instead, a loaded box could
    # see it end before the second was started, which then resumed the store itself)
    hold = tmp_path / "hold"
    hold.touch()
    slow = start("extract", pipeline, "--out", store, JOURNEY_HOLD=str(hold), JOURNEY_HOLD_AT="90")
    deadline = time.monotonic() + 240
    while kdcache.open_store(str(store)).info()["writer"] is None and slow.poll() is None:
        assert time.monotonic() < deadline, "the resuming extract took no lock within 240 s"
        time.sleep(0.05)
    code, second = invoke("extract", pipeline, "--out", store)  # in this process: refused while the slow one is held
    hold.unlink()
    assert slow.wait(timeout=240) == 0, slow.stderr.read()  # 120 s: too short for a loaded box
    assert code == 1 and second.startswith(f"Error: {str(store)!r} is being written by kdcache pid {slow.pid} on ") and \
        second.count("\n") == 1, second
    runs = [start("train", pipeline, "--cache", store, "--out", tmp_path / "a"),
            start("train", pipeline, "--cache", store, "--out", tmp_path / "b", "--set", "train.memory_budget_mb=0"),
            start("verify", store)]
    outputs = [p.communicate(timeout=240) for p in runs]
    assert [p.returncode for p in runs] == [0, 0, 0], outputs
    assert "verified: every check holds" in outputs[2][0]
    alone = kdcache.train(kdcache.load_pipeline(pipeline), str(store), str(tmp_path / "alone"))
    assert json.loads((tmp_path / "a" / "metrics.jsonl").read_text().splitlines()[-1])["loss"] == pytest.approx(alone["loss"])
