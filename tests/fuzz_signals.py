"""A seeded fuzzer of stops: SIGTERM (a scheduler's preemption) or SIGINT (Ctrl-C) sent to a real ``kdcache`` process at a
random moment, then the same command run again until it ends, its result compared with an uninterrupted run's.

Not part of the default suite (300 runs: about 10 minutes with ``--jobs 2`` on 2 cores). Run from the repository root::

    python tests/fuzz_signals.py [--seed 0] [--runs 200] [--jobs 2] [--only train extract ...] [--signals TERM INT]
                                 [--entry kdcache] [--replay CMD:SIG:MOMENT ...] [--json report.json]

Each command runs as the program does (``python -m kdcache``, the console script's entry; ``--entry kdcache.cli`` runs
``python -m kdcache.cli``) on ``tests/fixtures/tiny.toml``'s store (4 shards of 16 rows, 50 samples): ``train``
(3 epochs, ``--auto-resume``, run again until exit 0, then ``student.pt`` and ``heads.pt`` compared with an
uninterrupted run's, ``torch.equal``), ``extract`` (run again until exit 0, then every array, the manifest but its times
and every file's bytes compared with an uninterrupted extract's), ``pack`` and ``export`` (run again until exit 0, the
zip's members or the HDF5 file's datasets and attributes compared), ``import`` (of the export: run again until exit 0,
the store compared) and ``verify`` (the store's files unchanged). Each command's whole duration is measured first (an
uninterrupted run); each run's moment is drawn from 0 to that duration (5 % past it: the process's exit too).

Outcomes of the stopped process, each checked: its exit status is 0 (the signal came as the command ended), 128 + the
signal with exactly one line on stderr, ``Error: stopped by SIGTERM …`` / ``Error: interrupted …``, or minus the signal
with nothing on stderr, only where no handler took the signal when it was sent (``/proc/PID/status``: Python starting);
nothing on stderr with exit 0; no ``Traceback``, no ``Exception ignored``; it ends within ``--late`` seconds of the
signal; what its line says is kept is there (``the N shards done so far are kept``, ``its last checkpoint is kept``, ``no
file was written``, ``… was written whole before it stopped and is kept``). Then the runs again (no signal) must each
exit 0 without a traceback, and the result must equal the uninterrupted run's. Not defects, counted apart: ``start``
(Python's own report of a Ctrl-C as it started, before any code of kdcache's ran: importing ``site``, runpy finding the
module) and ``0 ran on`` (exit 0 more than ``--lost`` seconds after a handler took the signal: put off in an import, a
finalizer, a thread's start or an HDF5 write until the command had ended, as kdcache documents; past ``PUT_OFF_S`` more
it is ``lost``, a defect). The summary lists the runs, the outcomes by command and signal, and each defect with the
``--replay`` argument that sends the same signal at the same moment again (a moment on a loaded machine lands near,
not exactly, where it did).
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
sys.path[:0] = [str(ROOT), str(FIXTURES)]

TOML = FIXTURES / "tiny.toml"
TRAIN = ["--epochs", "3", "--set", "train.features={}", "--set", "train.eval_split=''", "--set", "train.checkpoint_every=1"]
COMMANDS = ("train", "extract", "pack", "export", "import", "verify")
SIGNALS = {"TERM": signal.SIGTERM, "INT": signal.SIGINT}
LINES = {signal.SIGTERM: "Error: stopped by SIGTERM", signal.SIGINT: "Error: interrupted"}
TIMEOUT_S = 180
RERUNS = 4
PUT_OFF_S = 10.0  # kdcache.cli.PUT_OFF_S: the longest a handler puts a signal off (in an import, a finalizer)


def env() -> dict[str, str]:
    """One torch thread, this checkout's kdcache, no fault injection of the tests' fixtures."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("ZOO_", "KDCACHE_FAULT"))}
    return base | {"OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), base.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


def argv(command: str, work: Path, ref: dict[str, Any]) -> list[str]:
    """The command line of ``command`` writing under ``work`` (``ref``: the uninterrupted results it reads)."""
    if command == "train":
        return ["train", str(TOML), "--cache", ref["store"], "--out", str(work / "run"), *TRAIN, "--auto-resume", "--no-progress"]
    if command == "extract":
        return ["extract", str(TOML), "--out", str(work / "s.zarr"), "--no-progress"]
    if command == "pack":
        return ["pack", ref["store"], str(work / "s.zarr.zip")]
    if command == "export":
        return ["export", ref["store"], str(work / "s.h5")]
    if command == "import":
        return ["import", ref["h5"], str(work / "i.zarr")]
    return ["verify", ref["store"]]


def handled(pid: int, signum: int) -> str | None:
    """How process ``pid`` takes ``signum``: ``caught`` (a handler), ``ignored`` or ``default`` (None: it has ended)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    masks = {k: int(v, 16) for k, v in re.findall(r"^(SigCgt|SigIgn):\s*([0-9a-f]+)$", text, re.M)}
    bit = 1 << (signum - 1)
    return "caught" if masks.get("SigCgt", 0) & bit else "ignored" if masks.get("SigIgn", 0) & bit else "default"


def launch(args: list[str], entry: str, signum: int | None = None, moment: float = 0.0) -> dict[str, Any]:
    """Run ``kdcache ARGS``; with ``signum``, sent ``moment`` seconds after the start. Its exit status, stderr, times."""
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", entry, *args], env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    out: dict[str, Any] = {"sent": None, "handled": None}
    if signum is not None:
        try:
            proc.wait(timeout=moment)
        except subprocess.TimeoutExpired:
            out["handled"] = handled(proc.pid, signum)
            proc.send_signal(signum)
            out["sent"] = time.perf_counter() - started
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        out["hang"] = True
    out.update(rc=proc.returncode, stdout=stdout, stderr=stderr, took=time.perf_counter() - started)
    return out


# ------------------------------------------------------------------------------------------------ results


def digest_files(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.relative_to(folder).as_posix() not in skip}


def store_result(location: Path) -> Any:
    """A store as compared: its manifest but for times, every array, every file's bytes but the root metadata's."""
    from reference import read_store, without_times

    manifest, arrays = read_store(location)
    return {"manifest": without_times(manifest), "arrays": {k: hashlib.sha256(v.tobytes()).hexdigest() + str(v.dtype) + str(v.shape)
                                                           for k, v in arrays.items()},
            "files": digest_files(location, ("zarr.json",))}


def result(command: str, work: Path, ref: dict[str, Any]) -> Any:
    """What ``command`` made under ``work``, in a form compared with ``==``."""
    if command == "train":
        import torch

        return {name: {k: v.numpy().tobytes().hex() for k, v in torch.load(work / "run" / name, weights_only=True).items()}
                for name in ("student.pt", "heads.pt")}
    if command == "extract":
        return store_result(work / "s.zarr")
    if command == "import":
        return store_result(work / "i.zarr")
    if command == "pack":
        with zipfile.ZipFile(work / "s.zarr.zip") as z:
            return {i.filename: hashlib.sha256(z.read(i)).hexdigest() for i in z.infolist()}
    if command == "export":
        import h5py
        import numpy as np

        items: dict[str, Any] = {}
        with h5py.File(work / "s.h5", "r") as f:
            def visit(name: str, node: Any) -> None:
                value = hashlib.sha256(np.asarray(node[()]).tobytes()).hexdigest() if isinstance(node, h5py.Dataset) else None
                items[name] = (value, {k: repr(v) for k, v in node.attrs.items() if k not in ("created", "completed", "exported")})
            f.visititems(visit)
            items["/"] = {k: repr(v) for k, v in f.attrs.items()}
        return items
    return digest_files(Path(ref["store"]))  # verify: the store it read, unchanged


def shards_done(location: Path) -> int | None:
    from kdcache.store import open_store

    try:
        return int(open_store(str(location)).done().sum()) if (location / "zarr.json").exists() else 0
    except Exception:  # noqa: BLE001 - a store begun without its arrays
        return None


def kept(command: str, line: str, work: Path) -> list[str]:
    """What the stop's line says is kept, checked against what is there now."""
    found = []
    m = re.search(r"the (\d+) shards? done so far (?:is|are) kept", line)
    if m and command in ("extract", "import"):
        done = shards_done(work / ("s.zarr" if command == "extract" else "i.zarr"))
        if done != int(m.group(1)):
            found.append(f"kept: the line says {m.group(1)} shards done, the store has {done}")
    if "no shard was written" in line and command in ("extract", "import"):
        done = shards_done(work / ("s.zarr" if command == "extract" else "i.zarr"))
        if done:
            found.append(f"kept: the line says no shard was written, the store has {done}")
    if "its last checkpoint is kept" in line and not (work / "run" / "checkpoint.pt").exists():
        found.append("kept: the line says a checkpoint is kept, there is none")
    if "written whole before it stopped and is kept" in line and not [p for p in work.iterdir() if not p.name.endswith(".part")]:
        found.append("kept: the line says the file is kept, there is none")
    if "no file was written" in line:
        left = [p.name for p in work.iterdir()]
        if left:
            found.append(f"kept: the line says no file was written, the folder holds {left}")
    return found


# ------------------------------------------------------------------------------------------------ one run


def one(command: str, signum: int, moment: float, ref: dict[str, Any], entry: str, late_s: float, lost_s: float) -> dict[str, Any]:
    """Stop ``command`` by ``signum`` at ``moment``, run it again until it ends, compare: the run's findings."""
    work = Path(tempfile.mkdtemp(prefix=f"kdcache-sigfuzz-{command}-"))
    try:
        args = argv(command, work, ref)
        first = launch(args, entry, signum, moment)
        found = stopped_defects(first, signum, late_s, lost_s)
        line = first["stderr"].strip()
        found += kept(command, line, work)
        again = 0
        rc = first["rc"]
        done = "there is nothing to run again" in line  # pack, export: stopped once the file was in place
        while rc != 0 and again < RERUNS and not first.get("hang") and not done:
            again += 1
            r = launch(args, entry)
            rc = r["rc"]
            if r["rc"] != 0 or "Traceback" in r["stderr"] or "Exception ignored" in r["stderr"] or r.get("hang"):
                found.append(f"rerun {again}: exit {r['rc']}: {r['stderr'].strip()[-600:]}")
                break
        if (rc == 0 or done) and not found:
            try:
                if result(command, work, ref) != ref["results"][command]:
                    found.append("differs: the result differs from the uninterrupted run's")
            except Exception as e:  # noqa: BLE001 - what the fuzzer looks for
                found.append(f"differs: the result cannot be read: {type(e).__name__}: {e}"[:600])
        outcome = "hang" if first.get("hang") else "start" if first["rc"] in (-signum, 1) and starting(first["stderr"]) else f"{first['rc']}"
        if outcome == "0" and first["handled"] == "caught" and first["took"] - first["sent"] > lost_s:
            outcome = "0 ran on"  # a handler put it off (an import, a finalizer, a thread's start) until the command ended
        return {"command": command, "signal": signal.Signals(signum).name[3:], "moment": round(moment, 3), "outcome": outcome,
                "sent": first["sent"], "handled": first["handled"], "reruns": again, "found": found, "line": line[-600:]}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def starting(err: str) -> bool:
    """Whether ``err`` is Python's own report of a signal as it started, before any code of kdcache ran: as it imported
    ``site`` ("Fatal Python error: init_import_site") or as runpy looked for the module to run (a traceback of frozen
    frames alone). Python's handler of SIGINT is installed then already; nothing of kdcache's can take it."""
    if "init_import_site" in err:
        return True
    frames = re.findall(r'^  File "([^"]+)"', err, re.M)
    return "Traceback" in err and bool(frames) and all(f.startswith("<frozen ") for f in frames) and err.rstrip().endswith("KeyboardInterrupt")


def stopped_defects(r: dict[str, Any], signum: int, late_s: float, lost_s: float) -> list[str]:
    """What is wrong with how the process sent ``signum`` ended."""
    rc, err = r["rc"], r["stderr"]
    lines = [x for x in err.splitlines() if x.strip()]
    found = []
    if r.get("hang"):
        return [f"hang: still running {TIMEOUT_S} s after its start"]
    if rc in (-signum, 1) and starting(err):
        return []  # counted as "start" by the caller
    if "Traceback" in err or "Exception ignored" in err:
        found.append("traceback")
    if rc == 128 + signum:
        if len(lines) != 1 or not lines[0].startswith(LINES[signum]):
            found.append(f"lines: exit {rc} with {len(lines)} lines on stderr")
    elif rc == -signum:
        if r["handled"] in ("caught", "ignored"):
            found.append(f"killed: ended by the signal (exit {rc}) though a handler took it when it was sent")
        if lines:
            found.append(f"lines: exit {rc} with {len(lines)} lines on stderr")
    elif rc == 0:
        if lines:
            found.append(f"lines: exit 0 with {len(lines)} lines on stderr")
        if r["handled"] == "caught" and r["took"] - r["sent"] > PUT_OFF_S + lost_s:  # ignored: the command had ended
            found.append(f"lost: a handler took the signal, and the command went on to its end, {r['took'] - r['sent']:.1f} s later, exit 0")
    else:
        found.append(f"exit: {rc}")
    if r["sent"] is not None and r["took"] - r["sent"] > late_s:
        found.append(f"late: ended {r['took'] - r['sent']:.1f} s after the signal")
    return found


# ------------------------------------------------------------------------------------------------ main


def references(work: Path, entry: str, commands: list[str]) -> dict[str, Any]:
    """Uninterrupted runs: the store the others read, each command's result and whole duration."""
    ref: dict[str, Any] = {"store": str(work / "s.zarr"), "h5": str(work / "s.h5"), "results": {}, "seconds": {}}
    for command in ("extract", "export", *[c for c in commands if c not in ("extract", "export")]):
        here = work if command in ("extract", "export") else work / command
        here.mkdir(exist_ok=True)
        r = launch(argv(command, here, ref), entry)
        if r["rc"] != 0 or r["stderr"].strip():
            raise SystemExit(f"the uninterrupted {command} failed: exit {r['rc']}: {r['stderr'][-2000:]}")
        ref["results"][command], ref["seconds"][command] = result(command, here, ref), r["took"]
    return ref


def main(argv_: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", type=int, default=200)
    p.add_argument("--jobs", type=int, default=2, help="runs at once")
    p.add_argument("--only", nargs="*", choices=COMMANDS, help="commands to stop (default: all)")
    p.add_argument("--signals", nargs="*", choices=list(SIGNALS), default=list(SIGNALS))
    p.add_argument("--entry", default="kdcache", help="module run with python -m (kdcache: the console script's entry)")
    p.add_argument("--late", type=float, default=15.0, help="seconds after the signal by which the process must end")
    p.add_argument("--lost", type=float, default=2.0, help="seconds a command that a handler took the signal in may go on to "
                   "exit 0 (the signal came as it ended)")
    p.add_argument("--replay", nargs="*", default=[], metavar="CMD:SIG:MOMENT", help="these runs only (from a summary)")
    p.add_argument("--json", help="write every run here")
    args = p.parse_args(argv_)
    commands = list(args.only or COMMANDS)
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # started in the background by a shell: the commands would
        signal.signal(signal.SIGINT, signal.default_int_handler)  # inherit it ignored, and every Ctrl-C sent be lost
    work = Path(tempfile.mkdtemp(prefix="kdcache-sigfuzz-"))
    try:
        if args.replay:
            plans = [(c, SIGNALS[s], float(m)) for c, s, m in (x.split(":") for x in args.replay)]
            commands = sorted({c for c, _, _ in plans})
        ref = references(work, args.entry, commands)
        print("uninterrupted:", {c: f"{ref['seconds'][c]:.2f} s" for c in commands}, flush=True)
        rng = random.Random(args.seed)
        if not args.replay:
            plans = []
            for _ in range(args.runs):
                command = rng.choice(commands)
                plans.append((command, SIGNALS[rng.choice(args.signals)], rng.uniform(0, ref["seconds"][command] * 1.05)))
        return fuzz(plans, ref, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def fuzz(plans: list[tuple[str, int, float]], ref: dict[str, Any], args: argparse.Namespace) -> int:
    tally: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    runs: list[dict[str, Any]] = []
    lock = threading.Lock()

    def go(n: int, plan: tuple[str, int, float]) -> None:
        r = one(*plan, ref, args.entry, args.late, args.lost)
        with lock:
            runs.append(r)
            label = f"{r['command']}:{r['signal']}"
            tally[label]["runs"] += 1
            tally[label][f"exit {r['outcome']}"] += 1
            for f in r["found"]:
                tally[label][f.split(":")[0]] += 1
            if r["found"]:
                print(f"[{n + 1}/{len(plans)}] --replay {r['command']}:{r['signal']}:{r['moment']}  exit {r['outcome']} "
                      f"(sent at {r['sent'] or 0:.3f} s, handled {r['handled']}): {r['found']}\n    {r['line'][-400:]}", flush=True)

    with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
        for f in [pool.submit(go, n, plan) for n, plan in enumerate(plans)]:
            f.result()
    print(json.dumps({k: dict(v) for k, v in sorted(tally.items())}, indent=1))
    defects = [r for r in runs if r["found"]]
    kinds = collections.Counter(f.split(":")[0] for r in defects for f in r["found"])
    print(f"{len(runs)} runs, {len(defects)} with a defect" + (f" ({dict(kinds)})" if kinds else ""))
    for r in defects:
        print(f"  --replay {r['command']}:{r['signal']}:{r['moment']}  {r['found']}")
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1, default=str))
    return 1 if defects else 0


if __name__ == "__main__":
    sys.exit(main())
