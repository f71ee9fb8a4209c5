"""Bad input to the CLI's own options (not the pipeline's), in the matrix's form (see test_bad_input).

Also: every click usage error is one line, ``Error: <message> (see 'kdcache <cmd> --help')``, exit 2;
and a failed command writes nothing into the current folder (an empty --out once meant "here").
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import traceback
from pathlib import Path

import dask
# distributed's config defaults loaded before a test's dask.config.set of a distributed.* key: that set's exit deletes the
# whole tree it found absent, and the next test's connect failed on KeyError 'tcp' (this file run alone, not in the suite)
import distributed  # noqa: F401
import pytest
from click.testing import CliRunner

import test_bad_input as matrix
from kdcache.cli import main
from reference import free_port
from test_bad_input import KDCACHE, TINY, TRAIN, Case, Ctx, check_output, extract, invoke, prepare, snapshot, train, trained


def exported(ctx: Ctx) -> Path:
    """The case's store exported to ``ctx.tmp / "e.h5"`` (a file kdcache import accepts)."""
    result = CliRunner().invoke(main, ["export", str(ctx.store), str(ctx.tmp / "e.h5")])
    assert result.exit_code == 0, result.output
    return ctx.tmp / "e.h5"


def packed(ctx: Ctx) -> Path:
    """The case's store packed to ``ctx.tmp / "p.zarr.zip"``."""
    result = CliRunner().invoke(main, ["pack", str(ctx.store), str(ctx.tmp / "p.zarr.zip")])
    assert result.exit_code == 0, result.output
    return ctx.tmp / "p.zarr.zip"


def tiny_demo(out: Path) -> list:
    """``kdcache demo --out out`` with the tiny teacher, dataset and student for MNIST's (a demo that ran took seconds)."""
    tiny = TINY.parent / "tiny.py"
    return ["demo", "--out", out, "--no-progress", "--set", f"teacher.factory={tiny}:teacher", "--set", f"data.factory={tiny}:dataset",
            "--set", f"student.factory={tiny}:student", "--set", "train.steps=2", "--set", "extract.device=cpu",
            "--set", "train.device=cpu", "--set", 'targets.layers=["features.3"]']


def broken_link(ctx: Ctx, name: str, to: str = "gone") -> Path:
    """A symlink ``ctx.tmp / name`` to ``ctx.tmp / to / name``, which does not exist (``to``, where it is made a file here,
    cannot be made a folder either)."""
    if to != "gone":
        (ctx.tmp / to).write_text("a file, not a folder\n")
    (ctx.tmp / name).symlink_to(ctx.tmp / to / name)
    return ctx.tmp / name


def teacher_check(ctx: Ctx, *args: str) -> list:
    return ["verify", ctx.store, "--teacher-check", "3", "--pipeline", TINY, *args]


CASES = [
    # -- a value a flag or --set gave is named as that flag or --set, not as the pipeline file (whose value is another)
    Case("flag-value-named-as-the-flag", lambda c: extract("--out", c.new, "--batch-size", "0"),
         ("Error: --batch-size 0: extract.batch_size must be >= 1, got 0",)),
    Case("set-table-named-as-the-set", lambda c: extract("--out", c.new, "--set", "extract={batch_size=0}"),
         ("Error: --set extract={batch_size=0}: extract.batch_size must be >= 1, got 0",)),
    Case("epochs-flag-named-as-the-flag", lambda c: train(c, "--epochs", "0"), ("Error: --epochs 0: train.epochs must be >= 1, got 0",), store=True),
    Case("set-dotted-layer-unquoted", lambda c: extract("--out", c.new, "--dry-run", "--set", "train.features.features.3.weight=2"),
         ("""Error: --set train.features.features.3.weight=2: unknown key "train.features.'features'.3"; a layer name holding dots is """
          """one quoted key: train.features."features.3" (on a command line: --set 'train.features."features.3".weight=2')""",)),
    Case("set-layer-key-named-as-the-set", lambda c: train(c, "--set", 'train.features."features.3".weight=-1'),
         ("""Error: --set train.features."features.3".weight=-1: train.features.'features.3'.weight must be a finite number >= 0, got -1""",),
         store=True),
    Case("set-typo-named-as-the-set", lambda c: extract("--out", c.new, "--set", "extract.batch_sise=4"),
         ("Error: --set extract.batch_sise=4: unknown key 'extract.batch_sise'; did you mean extract.batch_size?",)),
    # -- --scheduler: an address that does not parse is refused before the store is created; one that parses but
    #    does not answer is refused before it too: test_scheduler_that_does_not_answer
    Case("workers-above-limit", lambda c: extract("--out", c.new, "--workers", "100000"), ("'--workers': 100000 is not in the range",), code=2),
    Case("scheduler-garbage", lambda c: extract("--out", c.new, "--scheduler", "garbage"),
         ("scheduler address 'garbage' is not valid (missing port number", "tcp://HOST:PORT", "--workers N for a local cluster")),
    Case("workers-and-scheduler", lambda c: extract("--out", c.new, "--workers", "2", "--scheduler", "tcp://127.0.0.1:8786"),
         ("--workers 2 starts a local dask cluster and --scheduler tcp://127.0.0.1:8786 uses an existing one", "pass one of them"), code=2),
    Case("scheduler-empty", lambda c: extract("--out", c.new, "--scheduler", ""), ("scheduler address '' is not valid",)),
    Case("scheduler-bad-port", lambda c: extract("--out", c.new, "--scheduler", "tcp://127.0.0.1:abc"),
         ("scheduler address 'tcp://127.0.0.1:abc' is not valid",)),
    # -- --workers
    Case("stats-workers-negative", lambda c: ["stats", c.store, "--workers", "-1"],
         ("Invalid value for '--workers': -1 is not in the range 1<=x<=", "(see 'kdcache stats --help')"), code=2, store=True),
    Case("stats-workers-0", lambda c: ["stats", c.store, "--workers", "0"], ("'--workers': 0 is not in the range 1<=x<=",),
         code=2, store=True),
    Case("extract-workers-0", lambda c: extract("--out", c.new, "--workers", "0"),
         ("'--workers': 0 is not in the range 1<=x<=", "(see 'kdcache extract --help')"), code=2),
    # -- verify's options
    Case("verify-seed-negative", lambda c: teacher_check(c, "--seed", "-1"), ("'--seed': -1 is not in the range x>=0",),
         code=2, store=True),
    Case("verify-tolerance-nan", lambda c: teacher_check(c, "--tolerance", "nan"),
         ("'--tolerance': nan is not a finite number; use a number >= 0",), code=2, store=True),
    Case("verify-tolerance-inf", lambda c: teacher_check(c, "--tolerance", "inf"), ("'--tolerance': inf is not a finite number",),
         code=2, store=True),
    Case("verify-tolerance-negative", lambda c: teacher_check(c, "--tolerance", "-1"),
         ("'--tolerance': -1.0 is not in the range x>=0",), code=2, store=True),
    Case("verify-teacher-check-negative", lambda c: ["verify", c.store, "--teacher-check", "-5", "--pipeline", TINY],
         ("'--teacher-check': -5 is not in the range x>=0", "(see 'kdcache verify --help')"), code=2, store=True),
    # -- an empty location to write (it would be the current folder)
    Case("train-out-empty", lambda c: ["train", TINY, "--cache", c.store, "--out", ""],
         ("Invalid value for '--out': '' is empty; name the folder or file to write", "(see 'kdcache train --help')"),
         code=2, store=True),
    Case("train-out-blank", lambda c: ["train", TINY, "--cache", c.store, "--out", "  "], ("'--out': '  ' is empty",),
         code=2, store=True),
    Case("extract-out-empty", lambda c: extract("--out", ""), ("'--out': '' is empty",), code=2),
    Case("extract-out-blank", lambda c: extract("--out", " "), ("'--out': ' ' is empty",), code=2),
    Case("demo-out-empty", lambda c: ["demo", "--out", ""], ("'--out': '' is empty", "(see 'kdcache demo --help')"), code=2),
    Case("pack-out-empty", lambda c: ["pack", c.store, ""], ("Invalid value for 'OUT': '' is empty",), code=2, store=True),
    Case("export-out-blank", lambda c: ["export", c.store, " "], ("'OUT': ' ' is empty",), code=2, store=True),
    Case("import-store-inside-a-store", lambda c: ["import", c.tmp / "e.h5", c.store / "copy.zarr"],
         (f"/{TRAIN}/copy.zarr' is inside the store '", "choose another STORE outside the store folder"), store=True, prior=exported),
    Case("import-store-empty", lambda c: ["import", c.tmp / "e.h5", ""], ("'STORE': '' is empty", "(see 'kdcache import --help')"),
         code=2, store=True, prior=exported),
    # -- a URL where a command writes a local folder (Path merged its slashes: demo wrote the folder 's3:' here)
    Case("train-out-url", lambda c: ["train", TINY, "--cache", c.store, "--out", "s3://bucket/run"],
         ("--out 's3://bucket/run' is a URL; kdcache train writes a local folder", "then upload it"), store=True),
    Case("demo-out-url", lambda c: ["demo", "--out", "s3://bucket/demo"],
         ("--out 's3://bucket/demo' is a URL; kdcache demo writes a local folder", "then upload it"),),
    # -- a store, or a folder inside one, where demo writes its folder: it wrote its stores, students and summary into the
    #    store's folder (exit 0), where they then kept an extract --overwrite of the store refused (train --out refuses both)
    Case("demo-out-a-store", lambda c: tiny_demo(c.store),
         (f"/{TRAIN}' is a zarr store; kdcache demo writes its two stores, three students and summary into a folder of "
          "its own: choose another --out outside any store (e.g. '", "/demo')"), store=True),
    Case("demo-out-inside-a-store", lambda c: tiny_demo(c.store / "targets" / "demo"),
         (f"/{TRAIN}/targets/demo' is inside the zarr store '", "choose another --out outside any store"), store=True),
    # -- a training run's folder: the demo's stores, students and summary went beside the run's files (exit 0)
    Case("demo-out-a-training-run", lambda c: tiny_demo(c.run),
         ("/run' holds a kdcache training run ('pipeline.json', 'checkpoint.pt', 'student.pt', 'heads.pt', 'metrics.jsonl'); "
          "kdcache demo writes its two stores, three students and summary into a folder of its own: choose another --out (e.g. '",
          "/run-demo')"), store=True, prior=trained),
    # -- a broken symlink where a command writes (ln -s /scratch/run run, before /scratch/run is made): train and demo said
    #    "cannot write 'run': File exists; fix the cause and rerun", pack and export renamed their file over the link (exit 0),
    #    extract and import (which write a store through such a link, its folder made) named only their lock file's folder
    Case("train-out-broken-link", lambda c: ["train", TINY, "--cache", c.store, "--out", broken_link(c, "run")],
         ("Error: --out '", "/run' is a broken symlink, to '", "/gone/run', which does not exist; remove the link, create the folder "
          "it leads to, or choose another --out"), store=True),
    Case("train-out-under-a-broken-link", lambda c: ["train", TINY, "--cache", c.store, "--out", broken_link(c, "runs") / "a"],
         ("/runs/a' lies under '", "/runs', a broken symlink, to '", "/gone/runs', which does not exist; remove the link"), store=True),
    Case("demo-out-broken-link", lambda c: tiny_demo(broken_link(c, "demo")),
         ("Error: --out '", "/demo' is a broken symlink, to '", "/gone/demo', which does not exist; remove the link, create the folder "
          "it leads to, or choose another --out"),),
    Case("pack-out-broken-link", lambda c: ["pack", c.store, broken_link(c, "p.zarr.zip")],
         ("Error: OUT '", "/p.zarr.zip' is a broken symlink, to '", "/gone/p.zarr.zip', which does not exist; the file would replace "
          "the link, not go where it leads: pass that path as OUT (its folder is made), remove the link, or choose another OUT"), store=True),
    Case("export-out-broken-link", lambda c: ["export", c.store, broken_link(c, "e.h5")],
         ("Error: OUT '", "/e.h5' is a broken symlink, to '", "/gone/e.h5', which does not exist; the file would replace"), store=True),
    # under one (a folder of packs on a scratch disk not mounted): the file would not replace that link, and its target, a
    # folder to be, is no OUT to pass ("pass that path as OUT" named it)
    Case("pack-out-under-a-broken-link", lambda c: ["pack", c.store, broken_link(c, "packs") / "p.zarr.zip"],
         ("Error: OUT '", "/packs/p.zarr.zip' lies under '", "/packs', a broken symlink, to '", "/gone/packs', which does not exist; "
          "its folder cannot be made through the link: create the folder it leads to, remove the link, or choose another OUT"), store=True),
    Case("export-out-under-a-broken-link", lambda c: ["export", c.store, broken_link(c, "exports") / "e.h5"],
         ("/exports/e.h5' lies under '", "/exports', a broken symlink, to '", "/gone/exports', which does not exist; its folder cannot "
          "be made through the link"), store=True),
    Case("extract-out-broken-link-to-no-folder", lambda c: extract("--out", broken_link(c, "s.zarr", to="afile")),
         ("Error: cannot write '", "/s.zarr': it is a broken symlink, to '", "/afile/s.zarr', which does not exist, and the folder '",
          "/afile' cannot be made there (File exists); remove the link, create the folder it leads to, or write the store elsewhere")),
    Case("import-store-broken-link-to-no-folder", lambda c: ["import", c.tmp / "e.h5", broken_link(c, "back.zarr", to="afile")],
         ("/back.zarr': it is a broken symlink, to '", "/afile/back.zarr', which does not exist, and the folder '"), store=True,
         prior=exported),
    # -- an empty location to read: it read the current folder ("no store at ''"; pack: "OUT ... is inside the store ''")
    Case("train-cache-empty", lambda c: ["train", TINY, "--cache", "", "--out", c.new],
         ("Invalid value for '--cache': '' is empty; name a store to read: a folder, a .zarr.zip file or a URL",
          "(see 'kdcache train --help')"), code=2),
    Case("train-eval-cache-empty", lambda c: train(c, "--eval-cache", ""),
         ("'--eval-cache': '' is empty; name a store of the eval split (leave --eval-cache out for none)",), code=2, store=True),
    Case("info-store-empty", lambda c: ["info", ""], ("Invalid value for 'STORE': '' is empty; name a store to read",
                                                      "(see 'kdcache info --help')"), code=2),
    Case("verify-store-blank", lambda c: ["verify", " "], ("'STORE': ' ' is empty; name a store to read",), code=2),
    Case("pack-store-empty", lambda c: ["pack", "", c.tmp / "p.zarr.zip"], ("'STORE': '' is empty; name a store to read",), code=2),
    Case("import-source-empty", lambda c: ["import", "", c.new], ("'SOURCE': '' is empty; name an HDF5 file written by kdcache export",),
         code=2),
    # -- a name of the other kind: export wrote its HDF5 file as OUT.zarr (info and train then refused it as no store), import
    #    made a store folder named STORE.h5, and a packed store given to import was "not HDF5 (file signature not found)"
    Case("export-out-named-as-a-store", lambda c: ["export", c.store, c.tmp / "copy.zarr"],
         ("OUT '", "/copy.zarr' is named as a store, but kdcache export writes one HDF5 file: name it *.h5 (e.g. '", "/copy.h5'); a store in "
          "one file is what kdcache pack writes (kdcache pack STORE copy.zarr.zip), and a copy of the store's folder is a store"), store=True),
    Case("import-store-named-as-hdf5", lambda c: ["import", c.tmp / "e.h5", c.tmp / "back.h5"],
         ("/back.h5' is named as an HDF5 file, but kdcache import writes a store (a folder of zarr objects): name it *.zarr (e.g. '",
          "/back.zarr'); the HDF5 file is what kdcache export writes"), store=True, prior=exported),
    Case("import-source-a-packed-store", lambda c: ["import", c.tmp / "p.zarr.zip", c.new],
         ("/p.zarr.zip' is a zip file (a store kdcache pack wrote?), not an HDF5 file written by kdcache export: a packed store is a "
          "store already, which info, train and verify read as it is",), store=True, prior=packed),
    Case("extract-pipeline-empty", lambda c: ["extract", "", "--out", c.new],
         ("Invalid value for 'PIPELINE': '' is empty; name a pipeline file (.toml)", "(see 'kdcache extract --help')"), code=2),
    Case("verify-pipeline-empty", lambda c: ["verify", c.store, "--teacher-check", "3", "--pipeline", ""],
         ("'--pipeline': '' is empty; name a pipeline file (.toml)",), code=2, store=True),
    # -- train's flags
    Case("train-resume-and-overwrite", lambda c: train(c, "--resume", "--overwrite"), ("--resume and --overwrite were given", "--resume continues the run in OUT", "--overwrite replaces it: pass one of them"),
         code=2, store=True, prior=trained),
    Case("train-epochs-and-steps", lambda c: train(c, "--epochs", "2", "--set", "train.steps=5"),
         ("--epochs N trains N epochs and --set train.steps=S exactly S steps; pass one of them",), code=2, store=True),
    Case("train-epochs-and-steps-in-a-table", lambda c: train(c, "--epochs", "2", "--set", "train={steps=5}"),
         ("--epochs N trains N epochs and --set train.steps=S exactly S steps; pass one of them",), code=2, store=True),
    Case("verify-set-without-pipeline", lambda c: ["verify", c.store, "--set", "extract.batch_size=8"],
         ("--set extract.batch_size=8 changes a value of --pipeline PIPELINE, which was not given", "(see 'kdcache verify --help')"),
         code=2, store=True),
    # --teacher-check's own options alone: the teacher was not checked and the report said "every check holds"
    Case("verify-pipeline-without-teacher-check", lambda c: ["verify", c.store, "--pipeline", TINY],
         ("--pipeline serves --teacher-check N, which was not given: the teacher would not be checked; pass --teacher-check N "
          "(the rows to recompute), or leave --pipeline out", "(see 'kdcache verify --help')"), code=2, store=True),
    Case("verify-seed-without-teacher-check", lambda c: ["verify", c.store, "--seed", "3"],
         ("--seed serves --teacher-check N, which was not given", "or leave --seed out"), code=2, store=True),
    Case("verify-tolerance-without-teacher-check", lambda c: ["verify", c.store, "--tolerance", "0.1"],
         ("--tolerance serves --teacher-check N, which was not given", "or leave --tolerance out"), code=2, store=True),
    # -- torchrun's environment set by hand or left over (a shell's export): int()'s ValueError, numpy's IndexError (RANK 1 of
    #    one process) and torch's rendezvous ValueError were tracebacks; WORLD_SIZE 0 ran as one process
    Case("launch-rank-not-a-number", lambda c: extract("--out", c.new), ("the environment variable RANK='x' is not a whole number "
         ">= 0; torchrun sets RANK, WORLD_SIZE,", "launch kdcache with torchrun", "or unset them to run one process"), env=(("RANK", "x"),)),
    Case("launch-rank-of-one-process", lambda c: train(c, "--epochs", "1"),
         ("the environment variable RANK=1 is outside 0..0 (WORLD_SIZE=1)", "launch kdcache with torchrun"), store=True,
         env=(("RANK", "1"), ("WORLD_SIZE", None))),
    Case("launch-world-size-0", lambda c: extract("--out", c.new), ("the environment variable WORLD_SIZE='0' is not a whole number >= 1",),
         env=(("WORLD_SIZE", "0"),)),
    Case("launch-local-world-size-blank", lambda c: train(c, "--epochs", "1"),
         ("the environment variable LOCAL_WORLD_SIZE='' is not a whole number >= 1",), store=True,
         env=(("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_WORLD_SIZE", ""))),
    Case("launch-local-rank-beyond-local-world-size", lambda c: train(c, "--epochs", "1"),
         ("the environment variable LOCAL_RANK=3 is outside 0..1 (LOCAL_WORLD_SIZE=2); torchrun sets RANK, WORLD_SIZE,",
          "launch kdcache with torchrun"), store=True,
         env=(("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "3"), ("LOCAL_WORLD_SIZE", "2"))),
    # -- commands that run in one process, under torchrun: each rank ran it whole (its own teacher, all on one GPU; its own report)
    Case("launch-extract-dry-run-under-torchrun", lambda c: extract("--dry-run"),
         ("kdcache extract --dry-run runs in one process, but the environment variable WORLD_SIZE=2 asks for 2 (torchrun's); run kdcache "
          "extract --dry-run without torchrun, with RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT unset; "
          "without --dry-run, kdcache extract runs under torchrun (its ranks share the shards)",),
         env=(("RANK", "1"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "1"))),
    Case("launch-verify-teacher-check-under-torchrun", lambda c: teacher_check(c),
         ("kdcache verify --teacher-check runs in one process, but the environment variable WORLD_SIZE=2 asks for 2 (torchrun's); run "
          "kdcache verify --teacher-check without torchrun, with RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and "
          "MASTER_PORT unset",), store=True,
         env=(("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "1"))),
    # -- pack, export and import write one file or store: under torchrun every rank wrote it whole (a rank that found it made by
    #    another failed: "exists; choose another output or pass --overwrite")
    Case("launch-pack-under-torchrun", lambda c: ["pack", c.store, c.tmp / "p.zarr.zip"],
         ("kdcache pack runs in one process, but the environment variable WORLD_SIZE=2 asks for 2 (torchrun's); run kdcache pack "
          "without torchrun, with RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT unset",), store=True,
         env=(("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "1"))),
    Case("launch-export-under-torchrun", lambda c: ["export", c.store, c.tmp / "e.h5"],
         ("kdcache export runs in one process, but the environment variable WORLD_SIZE=4 asks for 4 (torchrun's); run kdcache export "
          "without torchrun",), store=True,
         env=(("RANK", "3"), ("WORLD_SIZE", "4"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "1"))),
    Case("launch-import-under-torchrun", lambda c: ["import", c.tmp / "e.h5", c.new],
         ("kdcache import runs in one process, but the environment variable WORLD_SIZE=2 asks for 2 (torchrun's); run kdcache import "
          "without torchrun",), store=True, prior=exported,
         env=(("RANK", "1"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "1"))),
    Case("launch-without-master-address", lambda c: train(c, "--epochs", "1"),
         ("WORLD_SIZE=2 asks for that many processes joined by torch.distributed, but MASTER_ADDR and MASTER_PORT are not set",
          "launch kdcache with torchrun (torchrun --nproc-per-node N -m kdcache.cli ...)"), store=True,
         env=(("RANK", "1"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", None), ("MASTER_PORT", None))),
    Case("launch-extract-without-master-port", lambda c: extract("--out", c.new),
         ("WORLD_SIZE=2 asks for that many processes joined by torch.distributed, but MASTER_PORT is not set",),
         env=(("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", None))),
    Case("launch-without-rank", lambda c: extract("--out", c.new), ("WORLD_SIZE=2 asks for that many processes joined by "
         "torch.distributed, but RANK is not set",), env=(("RANK", None), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "1"))),
    # -- click's own usage errors, one line each
    Case("usage-no-such-command", lambda c: ["extrakt"], ("No such command 'extrakt'", "(see 'kdcache --help')"), code=2),
    Case("usage-no-such-option", lambda c: extract("--out", c.new, "--batchsize", "4"),
         ("No such option '--batchsize'. Did you mean '--batch-size'?", "(see 'kdcache extract --help')"), code=2),
    Case("usage-missing-argument", lambda c: ["extract"], ("Missing argument 'PIPELINE'", "(see 'kdcache extract --help')"), code=2),
    Case("usage-missing-out", lambda c: extract(), ("Missing option '--out'", "or pass --dry-run (see 'kdcache extract --help')"), code=2),
    Case("usage-dry-run-overwrite-without-out", lambda c: extract("--dry-run", "--overwrite"),
         ("--overwrite is about the store --out names, but there is no --out; add --out OUT (the dry run then checks OUT as the run "
          "would), or drop --overwrite (see 'kdcache extract --help')",), code=2),
    Case("usage-dry-run-storage-option-without-out", lambda c: extract("--dry-run", "--storage-option", "anon=true"),
         ("--storage-option is about the store --out names, but there is no --out",), code=2),
]
# the matrix's usage errors too: with the stricter one-line check below
CASES += [c for c in matrix.CASES if c.code == 2 and c.id not in {x.id for x in CASES}]


def check_one_line(case: Case, code: int, stdout: str, stderr: str) -> None:
    """check_output, and nothing but the Error line on stderr, even for a usage error (which also names --help)."""
    check_output(case, code, stdout, stderr)
    if not case.report:
        assert stderr.strip().splitlines() == [stderr.strip()], stderr
    if case.code == 2:
        assert stderr.strip().endswith(" --help')"), stderr


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_cli(case: Case, tmp_path: Path, tiny_store: str, monkeypatch: pytest.MonkeyPatch) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # an empty location must not mean "here"
    run, result = invoke(case, tmp_path, tiny_store)
    check_one_line(case, result.exit_code, result.stdout, result.stderr)
    run.check_untouched()
    assert list(cwd.iterdir()) == [], f"{case.id}: a failed command wrote into the current folder"


def check_stopped_before_anything(tmp_path: Path, tiny_store: str, name: str, address: str, expected: tuple[str, ...],
                                  connect: str = "1s") -> None:
    """``extract --scheduler address`` (dask's connect timeout ``connect``) stops in one line naming ``expected``, before
    the teacher is built (its factory marks a file) or anything is written (no store, no lock file)."""
    built = tmp_path / "teacher-was-built"
    (tmp_path / "teacher.py").write_text(f"import pathlib\n\ndef teacher():\n    pathlib.Path({str(built)!r}).touch()\n")
    never = f'teacher.factory="{tmp_path / "teacher.py"}:teacher"'
    case = Case(name, lambda c: extract("--out", c.new, "--scheduler", address, "--set", never), expected)
    run = prepare(case, tmp_path, tiny_store)
    with dask.config.set({"distributed.comm.timeouts.connect": connect}):
        result = CliRunner().invoke(main, run.args)
    assert not isinstance(result.exception, OSError), "".join(traceback.format_exception(result.exception))
    check_one_line(case, result.exit_code, result.stdout, result.stderr)
    run.check_untouched()
    assert sorted(p.name for p in run.ctx.new.parent.iterdir() if "kdcache-lock" in p.name) == []
    assert not built.exists(), "the teacher was built before the scheduler was reached"


def test_scheduler_that_does_not_answer(tmp_path: Path, tiny_store: str) -> None:
    """A refused connection is retried until ``distributed.comm.timeouts.connect`` (30 s by default; 1 s here); then
    the job stops before it has built the teacher or written anything (no store, no lock file)."""
    address = f"tcp://127.0.0.1:{free_port()}"
    check_stopped_before_anything(tmp_path, tiny_store, "scheduler-not-answering", address,
                                  (f"no dask scheduler answered at '{address}' (Timed out trying to connect", "after 1 s",
                                   "start one there (dask scheduler --port PORT), or use --workers N for a local cluster"))


def test_a_server_that_is_not_a_dask_scheduler(tmp_path: Path, tiny_store: str) -> None:
    """A server that accepts the connection and never answers dask's handshake (another service): dask's Client waits
    for the handshake for good, and the job hung, silent, until killed. It stops after ``distributed.comm.timeouts.connect``
    (1 s here; it was twice that), before anything is built or written."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        address = f"tcp://127.0.0.1:{server.getsockname()[1]}"
        check_stopped_before_anything(tmp_path, tiny_store, "scheduler-not-dask", address,
                                      (f"something at '{address}' accepted the connection but did not answer as a dask scheduler "
                                       "within 1 s", "the dashboard's HTTP port", "pass the address dask scheduler prints (tcp://HOST:PORT)"))


@pytest.mark.parametrize("reset", [False, True], ids=["closed", "reset"])
def test_a_server_that_closes_the_connection_at_once_is_not_a_dask_scheduler(tmp_path: Path, tiny_store: str, reset: bool) -> None:
    """A server that accepts the connection and closes it without a word (a service dropping a client it does not know)
    is named by that, before anything is built or written: dask's connect retried it until its timeout. So is one that
    resets it (a close with SO_LINGER 0): the reset could reach the first look at the server before its connection was
    seen made, which took it for a refused connection ('no dask scheduler answered ... Connection reset by peer')."""
    import struct
    import threading

    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def drop() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                conn = server.accept()[0]
                if reset:
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()

    thread = threading.Thread(target=drop, daemon=True)
    thread.start()
    address = f"tcp://127.0.0.1:{server.getsockname()[1]}"
    try:
        check_stopped_before_anything(tmp_path, tiny_store, "scheduler-closes", address,
                                      (f"something at '{address}' accepted the connection but closed the connection, not a dask "
                                       "scheduler's handshake", "pass the address dask scheduler prints (tcp://HOST:PORT)"))
    finally:
        stop.set()
        server.close()
        thread.join(5)


@pytest.fixture
def http_server(request):
    """``(tcp://HOST:PORT, held)`` of a real HTTP server on 127.0.0.1, in a thread: Python's ``http.server`` (which waits
    for a request's first line, and so says nothing to dask's handshake; ``held``: each connection's ``[accepted, ended]``,
    ``time.monotonic()`` as its handler saw them, ``ended`` None while it is open) or aiohttp's (which answers the bytes
    at once with ``HTTP/1.x 400 Bad Request`` and closes; ``held`` None)."""
    import asyncio
    import http.server
    import threading
    import time

    if request.param == "http.server":
        held: list[list[float | None]] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def setup(self) -> None:
                self.times = [time.monotonic(), None]
                held.append(self.times)
                super().setup()

            def finish(self) -> None:  # once the client closed the connection (the request's first line never came)
                self.times[1] = time.monotonic()
                super().finish()

            def log_message(self, *_) -> None:
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()  # shutdown() waits one
        yield f"tcp://127.0.0.1:{server.server_address[1]}", held
        server.shutdown()
        server.server_close()
        return
    web = pytest.importorskip("aiohttp.web")
    loop, ready, runner = asyncio.new_event_loop(), threading.Event(), None
    ports: list[int] = []

    def serve() -> None:
        nonlocal runner
        runner = web.AppRunner(web.Application())
        loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        loop.run_until_complete(site.start())
        ports.append(site._server.sockets[0].getsockname()[1])
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    ready.wait(10)
    yield f"tcp://127.0.0.1:{ports[0]}", None
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


@pytest.mark.parametrize("http_server, said, connect", [
    ("aiohttp", ("accepted the connection but answered 'HTTP/1.", " 400 Bad Request', not a dask scheduler's handshake"), 30),
    ("http.server", ("accepted the connection but did not answer as a dask scheduler within 2 s",), 2),
], indirect=["http_server"])
def test_an_http_server_given_as_the_scheduler_is_named_as_soon_as_it_answers(http_server: tuple[str, list | None], said: tuple[str, ...],
                                                                              connect: int, tmp_path: Path, tiny_store: str) -> None:
    """An HTTP server (the dashboard's port, 8787, given for the scheduler's 8786) that answers dask's handshake
    (aiohttp: "HTTP/1.0 400 Bad Request") is named at once by its answer: dask read its first 8 bytes as a message's
    length ("MemoryError: Unable to allocate 3.01 EiB", a traceback). One that waits for a request's first line
    (http.server) is named after the connect timeout (2 s here), not twice it. Timed where a loaded box adds nothing of
    the product's: the answered one under a connect timeout of 30 s, named in under half of it (with 2 s and a bound of
    1.5 s, a loaded box failed it both ways: 1.6 s to start the command, and the server's thread answering past the 2 s,
    named as a silent one), the silent one from its server's side, from the first connection accepted to the last one
    closed (the command's start is not in it)."""
    import time

    address, held = http_server
    started = time.monotonic()
    check_stopped_before_anything(tmp_path, tiny_store, "scheduler-http", address,
                                  (f"Error: something at '{address}' ", *said, "the dashboard's HTTP port",
                                   "pass the address dask scheduler prints (tcp://HOST:PORT)"), connect=f"{connect}s")
    took = time.monotonic() - started
    if held is None:
        assert took < connect / 2, f"{took:.1f} s: the answer was not taken at once (connect timeout {connect} s)"
    else:
        deadline = time.monotonic() + 30  # the server's thread sees the close after the command has returned
        while not (held and all(ended is not None for _, ended in held)):
            assert time.monotonic() < deadline, f"the server saw no connection, or one still open: {held}"
            time.sleep(0.01)
        waited = max(ended for _, ended in held) - min(accepted for accepted, _ in held)
        assert waited < 1.75 * connect, f"held {waited:.1f} s by {len(held)} connection(s) (connect timeout {connect} s)"


@pytest.mark.parametrize("args, code", [(["--help"], 0), (["extract", "--help"], 0), ([], 2)], ids=["help", "extract-help", "no-args"])
def test_help_is_unchanged(args: list[str], code: int) -> None:
    """--help, and ``kdcache`` alone (click's help with exit 2), still print the whole help, no Error line."""
    result = CliRunner().invoke(main, args)
    assert result.exit_code == code
    assert result.output.startswith("Usage: ") and "Options:" in result.output and "--help" in result.output, result.output
    assert "Error" not in result.output


def test_the_command_list_of_help_cuts_no_description() -> None:
    """``kdcache --help`` lists each command with a line of its own: click cut each docstring's first sentence with
    "..." ("Export a finished STORE as one HDF5 file OUT.h5 (layout:...", "Check a store: completeness, layout, checksums,
    values,..."); each command's line is whole."""
    result = CliRunner().invoke(main, ["--help"])
    listed = dict(re.findall(r"^  ([a-z]+) +(.+)$", result.output.split("Commands:", 1)[1], re.M))
    assert set(listed) == set(main.commands), result.output
    assert not [line for line in listed.values() if line.endswith("...")], result.output


@pytest.mark.slow
def test_one_line_in_a_real_process(tmp_path: Path) -> None:
    """stderr of a real ``kdcache`` process: the one line, for a usage error and a scheduler address alike."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    for args, code, fragment in [(["extract", str(TINY), "--out", ""], 2, "(see 'kdcache extract --help')"),
                                 (["extract", str(TINY), "--out", str(tmp_path / "s"), "--scheduler", "garbage"], 1, "'garbage'")]:
        proc = subprocess.run([str(KDCACHE), *args], capture_output=True, text=True, timeout=120, cwd=cwd)
        assert proc.returncode == code and proc.stdout == "", proc.stdout + proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: ") and fragment in lines[0], proc.stderr
    assert list(cwd.iterdir()) == []


@pytest.mark.parametrize("hidden, args, extra", [
    (("dask", "dask.array"), lambda c: ["stats", c.store], "dask"),
    (("h5py",), lambda c: ["export", c.store, c.tmp / "x.h5"], "hdf5"),
    (("h5py",), lambda c: ["import", c.tmp / "x.h5", c.new], "hdf5"),
    (("distributed",), lambda c: extract("--out", c.new, "--workers", "2"), "dask"),
], ids=["stats-without-dask", "export-without-h5py", "import-without-h5py", "workers-without-distributed"])
def test_a_missing_optional_dependency_is_one_line_before_anything_is_written(hidden, args, extra, tmp_path, tiny_store, monkeypatch):
    """README's first command installs kdcache without extras: a command that needs one says which, in one line."""
    ctx = Ctx(tmp_path)
    shutil.copytree(tiny_store, ctx.store)
    (tmp_path / "x.h5").write_bytes(b"")
    for name in hidden:  # as if not installed: importing it raises ModuleNotFoundError
        monkeypatch.setitem(sys.modules, name, None)
    before = snapshot(tmp_path)
    result = CliRunner().invoke(main, [str(a) for a in args(ctx)])
    assert result.exit_code == 1, result.output
    assert result.output.strip().splitlines() == [result.output.strip()] and "Traceback" not in result.output, result.output
    assert f"which is not installed; pip install 'kdcache[{extra}]'" in result.output, result.output
    assert snapshot(tmp_path) == before and not ctx.new.exists()


STREAM_TOO_BIG = Case("train-streaming-beyond-memory",
                      lambda c: train(c, "--set", "train.memory_budget_mb=0", "--set", "train.num_workers=2"),
                      ("streaming the targets of", "would hold up to 130 KiB at once, more than half of the 64 KiB of memory this process may use: "
                       "1 buffer of 4 shards (train.shuffle_buffer_shards = 4) "
                       "of 32.5 KiB each (16 rows of 2080 bytes: the arrays read, decoded), 1 per reader", "lower train.shuffle_buffer_shards or train.num_workers, "
                       "or re-extract the store with a smaller extract.shard_mb"), store=True)
SMALL_MACHINE = "import kdcache.cache as c; c.memory_limit = lambda: 64 * 2**10; import kdcache.cli as m; m.main(prog_name='kdcache')"


def test_streaming_beyond_the_machine_s_memory_is_one_line_and_writes_nothing(tmp_path: Path, tiny_store: str,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """tiny.toml streams 4 shards of 16 rows x 2080 bytes (features.3 too) in one buffer of 4 shards, whichever of the
    2 DataLoader workers reads it: 130 KiB, more than half of a 64 KiB machine."""
    from kdcache import cache

    monkeypatch.setattr(cache, "memory_limit", lambda: 64 * 2**10)
    run, result = invoke(STREAM_TOO_BIG, tmp_path, tiny_store)
    check_one_line(STREAM_TOO_BIG, result.exit_code, result.stdout, result.stderr)
    run.check_untouched()
    assert not run.ctx.run.exists()


@pytest.mark.slow
def test_streaming_beyond_the_machine_s_memory_in_a_real_process(tmp_path: Path, tiny_store: str) -> None:
    """The same in a real process (the machine's figure given by the command line that starts it): exit 1, the one
    line on stderr, no traceback, --out never made."""
    run = prepare(STREAM_TOO_BIG, tmp_path, tiny_store)
    proc = subprocess.run([sys.executable, "-c", SMALL_MACHINE, *run.args], capture_output=True, text=True, timeout=120)
    check_one_line(STREAM_TOO_BIG, proc.returncode, proc.stdout, proc.stderr)
    run.check_untouched()
    assert not run.ctx.run.exists()


NOBODY = "~kdcache-no-such-user"  # a '~user' no shell expands: no user has that name


@pytest.mark.parametrize("given, meant, said", [
    (NOBODY, f"./{NOBODY}", f"{NOBODY!r} is a name that only a shell expands"),
    (f"{NOBODY}/s.zarr", f"./{NOBODY}/s.zarr", f"'{NOBODY}/s.zarr' begins with {NOBODY!r}, which only a shell expands"),
    ("~/s.zarr", None, "'~/s.zarr' begins with '~', which only a shell expands")])
@pytest.mark.parametrize("where", ["--out", "train.eval_cache"])
def test_a_tilde_path_is_named_once_with_its_fixes(given: str, meant: str | None, said: str, where: str, tmp_path: Path, tiny_store: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A '~name' no shell expanded: the line said "'~run' begins with '~run' … a folder named '~run'" (the location three times,
    ``train.eval_cache: …`` too) and "write the folder out in full" where no user has that name, never that './~run' is
    the folder of that name. It names the location once, then the home folder's path where there is one, and './~name'
    for a folder so named (not for '~' itself, which 'rm -rf ~' takes for the home folder)."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    args = [*extract("--out", given)] if where == "--out" else \
        ["train", TINY, "--cache", tiny_store, "--out", "run", "--set", f"train.eval_cache={given!r}"]
    result = CliRunner().invoke(main, [str(a) for a in args])
    fix = f"pass {str(tmp_path / 'home' / 's.zarr')!r}" if meant is None else f"pass the path meant in full, or {meant!r} for that folder"
    prefix = "train.eval_cache: " if where == "train.eval_cache" else ""
    assert result.exit_code == 1 and result.stderr.strip() == (
        f"Error: {prefix}{said} (not in quotes, after --out=, or in a pipeline file): kdcache would take it as a folder of that "
        f"name in {str(tmp_path)!r}; {fix}"), result.output
    assert given.split("/")[0] not in os.listdir(tmp_path)
