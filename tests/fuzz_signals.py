"""A seeded fuzzer of stops: SIGTERM (a scheduler's preemption) or SIGINT (Ctrl-C) sent to a real ``kdcache`` process at a
random moment, then the same command run again until it ends, its result compared with an uninterrupted run's.

Not part of the default suite (300 runs: about 10 minutes with ``--jobs 2`` on 2 cores). Run from the repository root::

    python tests/fuzz_signals.py [--seed 0] [--runs 200] [--jobs 2] [--minutes M] [--only train extract ...]
                                 [--signals TERM INT] [--entry kdcache] [--replay N|CMD:SIG:MOMENT ...] [--json report.json]

Each command runs as the program does (``python -m kdcache``, the console script's entry; ``--entry kdcache.cli`` runs
``python -m kdcache.cli``) on ``tests/fixtures/tiny.toml``'s store (4 shards of 16 rows, 50 samples): ``train``
(3 epochs, ``--auto-resume``, run again until exit 0, then ``student.pt`` and ``heads.pt`` compared with an
uninterrupted run's, ``torch.equal``), ``extract`` (run again until exit 0, then every array, the manifest but its times
and every file's bytes compared with an uninterrupted extract's), ``pack`` and ``export`` (run again until exit 0, the
zip's members or the HDF5 file's datasets and attributes compared), ``import`` (of the export: run again until exit 0,
the store compared) and ``verify`` (the store's files unchanged). The seed draws each run's command, signal and moment
as a fraction of the command's whole duration, 0 to 1.05 (5 % past it: the process's exit too), before any run; the
moment in seconds is that fraction of the duration measured as the campaign goes (``Durations``: an uninterrupted run's
at the start, then every run's that the signal was not sent in, having ended before its moment, and an uninterrupted
run's timed again where the command's last 8 runs were all stopped; the median of the last 3), so a machine whose load
comes and goes still has its moments drawn within the commands (measured once, on a loaded machine, 58 of seed 11's 150
moments came after the command had ended). ``--minutes M`` starts no run after M minutes from the start.

Outcomes of the stopped process, each checked: its exit status is 0 (the signal came as the command ended), 128 + the
signal with exactly one line on stderr, ``Error: stopped by SIGTERM …`` / ``Error: interrupted …``, or minus the signal
with nothing on stderr, only where no handler took the signal when it was sent (``/proc/PID/status``: Python starting);
nothing on stderr with exit 0; no ``Traceback``, no ``Exception ignored``; it ends within ``--late`` seconds of the
signal; what its line says is kept is there (``the N shards done so far are kept``, ``its last checkpoint is kept``, ``no
file was written``, ``… was written whole before it stopped and is kept``). Then the runs again (no signal) must each
exit 0 without a traceback, and the result must equal the uninterrupted run's. Not defects, counted apart: ``start``
(Python's own report of a Ctrl-C as it started, before any code of kdcache's ran: importing ``site``, runpy finding the
module), ``0 ran on`` (exit 0 more than ``--lost`` seconds after a handler took the signal: put off in an import, a
finalizer, a thread's start or an HDF5 write until the command had ended, as kdcache documents; past ``PUT_OFF_S`` more
it is ``lost``, a defect), and ``not sent`` (the command had ended before its moment: the run tested nothing). The summary
lists the runs, the outcomes by command and signal, the durations last measured, how many runs the signal was sent in
and not, and each defect with two ``--replay`` arguments: ``CMD:SIG:MOMENT`` sends the same signal the same seconds
after the start again (on a machine running at another pace it lands elsewhere in the command), ``N`` (with the
campaign's ``--seed``, ``--only`` and ``--signals``) the seed's run N again, its signal at the same fraction of the
duration measured now (the same place in the command, as far as one run's pace is another's). It exits 1 where a run
has a defect, else 2 where most runs sent no signal (``NO TEST`` on stderr: the campaign tested nothing much), else 0.
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
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path
from typing import Any, NamedTuple

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
        if outcome == "0" and first["sent"] is None:
            outcome = "not sent"  # the command had ended before its moment: nothing was tested
        elif outcome == "0" and first["handled"] == "caught" and first["took"] - first["sent"] > lost_s:
            outcome = "0 ran on"  # a handler put it off (an import, a finalizer, a thread's start) until the command ended
        return {"command": command, "signal": signal.Signals(signum).name[3:], "moment": round(moment, 3), "outcome": outcome,
                "sent": first["sent"], "handled": first["handled"], "took": first["took"], "rc": first["rc"], "reruns": again,
                "found": found, "line": line[-600:]}
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


class Durations:
    """Each command's whole duration as measured lately, from which a run's moment is drawn: the uninterrupted run's at
    the start, then that of every run the signal was not sent in (it had ended before its moment: it ran whole), and of
    an uninterrupted run timed again where the command's last ``REMEASURE`` runs were all stopped (the machine may have
    slowed: their moments would crowd into its start). A moment is its run's drawn fraction of the median of the last
    ``WINDOW`` durations, so a campaign started on a loaded machine draws its moments within the commands once the load
    goes (seed 11, measured once: 58 of 150 moments came after the command had ended)."""

    WINDOW = 3
    REMEASURE = 8

    def __init__(self, seconds: dict[str, float]) -> None:
        self.recent = {c: collections.deque([s], maxlen=self.WINDOW) for c, s in seconds.items()}
        self.stopped: collections.Counter[str] = collections.Counter()
        self.retimed = 0
        self.lock = threading.Lock()

    def estimate(self, command: str) -> float:
        with self.lock:
            return statistics.median(self.recent[command])

    def stale(self, command: str) -> bool:
        """Whether the command's last REMEASURE runs were all stopped (its durations not measured since)."""
        with self.lock:
            return self.stopped[command] >= self.REMEASURE

    def ran(self, command: str, sent: float | None, took: float, rc: int | None) -> None:
        """A run of ``command`` ended: ``took`` is its whole duration where no signal was sent and it exited 0."""
        with self.lock:
            if sent is None and rc == 0:
                self.recent[command].append(took)
                self.stopped[command] = 0
            else:
                self.stopped[command] += 1


def retime(command: str, ref: dict[str, Any], entry: str, durations: Durations) -> None:
    """An uninterrupted run of ``command``, timed: its whole duration as the machine runs it now."""
    work = Path(tempfile.mkdtemp(prefix=f"kdcache-sigfuzz-{command}-"))
    try:
        r = launch(argv(command, work, ref), entry)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    with durations.lock:
        durations.retimed += 1
    if r["rc"] == 0 and not r["stderr"].strip():  # one that failed is not its duration (a stopped run will show why)
        durations.ran(command, None, r["took"], 0)


def parse_replay(text: str) -> tuple[int | None, str | None, int | None, float | None]:
    """``--replay``'s ``N`` (the seed's run N: its command, signal and fraction of the duration measured now) or
    ``CMD:SIG:MOMENT`` (that signal that many seconds after the start): (run, command, signal, moment)."""
    if text.isdigit():
        return int(text), None, None, None
    parts = text.split(":")
    if len(parts) != 3 or parts[0] not in COMMANDS or parts[1] not in SIGNALS:
        raise SystemExit(f"--replay {text!r}: expected a run's number (N) or CMD:SIG:MOMENT, CMD one of "
                         f"{', '.join(COMMANDS)}, SIG one of {', '.join(SIGNALS)} (as a summary prints them)")
    try:
        moment = float(parts[2])
    except ValueError:
        moment = -1.0
    if not moment >= 0:
        raise SystemExit(f"--replay {text!r}: the moment {parts[2]!r} is not a number of seconds >= 0 (as a summary prints it)")
    return None, parts[0], SIGNALS[parts[1]], moment


def draw(seed: int, runs: int, commands: list[str], signals: list[str]) -> list[Plan]:
    """The seed's runs: each one's command, signal and moment as a fraction of the command's duration (to 1.05: the
    process's exit too). Drawn before any run, so a seed's runs are the same whatever the machine's pace; only the
    moments in seconds, that fraction of the durations measured as the campaign goes, depend on it."""
    rng = random.Random(seed)
    plans = []
    for n in range(runs):
        command = rng.choice(commands)
        plans.append(Plan(n, command, SIGNALS[rng.choice(signals)], rng.uniform(0, 1.05)))
    return plans


class Plan(NamedTuple):
    run: int | None  # the seed's run number (None: a replay of a moment)
    command: str
    signum: int
    fraction: float | None  # of the command's duration measured at the run's start
    moment: float | None = None  # seconds, where replayed


def main(argv_: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", type=int, default=200)
    p.add_argument("--jobs", type=int, default=2, help="runs at once")
    p.add_argument("--minutes", type=float, default=0.0, help="start no run after this many minutes (0: no limit)")
    p.add_argument("--only", nargs="*", choices=COMMANDS, help="commands to stop (default: all)")
    p.add_argument("--signals", nargs="*", choices=list(SIGNALS), default=list(SIGNALS))
    p.add_argument("--entry", default="kdcache", help="module run with python -m (kdcache: the console script's entry)")
    p.add_argument("--late", type=float, default=15.0, help="seconds after the signal by which the process must end")
    p.add_argument("--lost", type=float, default=2.0, help="seconds a command that a handler took the signal in may go on to "
                   "exit 0 (the signal came as it ended)")
    p.add_argument("--replay", nargs="*", default=[], metavar="N|CMD:SIG:MOMENT",
                   help="these runs only, as a summary names them: N, the seed's run N (with the campaign's --seed, --only "
                   "and --signals: its fraction of the duration measured now), or CMD:SIG:MOMENT (that moment in seconds)")
    p.add_argument("--json", help="write every run here")
    args = p.parse_args(argv_)
    deadline = time.monotonic() + args.minutes * 60 if args.minutes else float("inf")
    commands = list(args.only or COMMANDS)
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # started in the background by a shell: the commands would
        signal.signal(signal.SIGINT, signal.default_int_handler)  # inherit it ignored, and every Ctrl-C sent be lost
    replays = [parse_replay(x) for x in args.replay]
    plans = draw(args.seed, max([args.runs, *[n + 1 for n, _, _, _ in replays if n is not None]]), commands, args.signals)
    if replays:
        plans = [plans[n] if n is not None else Plan(None, c, s, None, m) for n, c, s, m in replays]  # type: ignore[arg-type]
        commands = sorted({x.command for x in plans})
    work = Path(tempfile.mkdtemp(prefix="kdcache-sigfuzz-"))
    try:
        ref = references(work, args.entry, commands)
        print("uninterrupted:", {c: f"{ref['seconds'][c]:.2f} s" for c in commands}, flush=True)
        return fuzz(plans, ref, args, deadline)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def fuzz(plans: list[Plan], ref: dict[str, Any], args: argparse.Namespace, deadline: float = float("inf")) -> int:
    tally: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    runs: list[dict[str, Any]] = []
    lock = threading.Lock()
    durations = Durations({c: ref["seconds"][c] for c in {x.command for x in plans}})

    def go(n: int, plan: Plan) -> None:
        if time.monotonic() > deadline:
            return
        if plan.moment is None and durations.stale(plan.command):
            retime(plan.command, ref, args.entry, durations)
        estimate = durations.estimate(plan.command)
        moment = plan.moment if plan.moment is not None else plan.fraction * estimate
        r = one(plan.command, plan.signum, moment, ref, args.entry, args.late, args.lost)
        durations.ran(plan.command, r["sent"], r["took"], r["rc"])
        r.update(run=plan.run, fraction=None if plan.fraction is None else round(plan.fraction, 4), estimate=round(estimate, 3))
        with lock:
            runs.append(r)
            label = f"{r['command']}:{r['signal']}"
            tally[label]["runs"] += 1
            tally[label][r["outcome"] if r["outcome"] == "not sent" else f"exit {r['outcome']}"] += 1
            for f in r["found"]:
                tally[label][f.split(":")[0]] += 1
            if r["found"]:
                print(f"[{n + 1}/{len(plans)}] {replay(r, args.seed)}  exit {r['outcome']} "
                      f"(sent at {r['sent'] or 0:.3f} s, handled {r['handled']}): {r['found']}\n    {r['line'][-400:]}", flush=True)
            if len(runs) % 25 == 0:
                print(f"{len(runs)} runs, {sum(bool(x['found']) for x in runs)} with a defect, "
                      f"{sum(x['sent'] is None for x in runs)} sent no signal", file=sys.stderr, flush=True)

    with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
        for f in [pool.submit(go, n, plan) for n, plan in enumerate(plans)]:
            f.result()
    print(json.dumps({k: dict(v) for k, v in sorted(tally.items())}, indent=1))
    defects = [r for r in runs if r["found"]]
    unsent = sum(r["sent"] is None for r in runs)
    kinds = collections.Counter(f.split(":")[0] for r in defects for f in r["found"])
    print("durations (median of the last measured):", {c: f"{durations.estimate(c):.2f} s" for c in sorted(durations.recent)},
          f"{durations.retimed} uninterrupted runs timed again")
    print(f"{len(runs)} runs, {len(defects)} with a defect" + (f" ({dict(kinds)})" if kinds else "")
          + f"; the signal sent in {len(runs) - unsent}, not in {unsent} (the command had ended before its moment)"
          + (f"; --minutes {args.minutes:g} reached: {len(plans) - len(runs)} of {len(plans)} runs not started"
             if len(runs) < len(plans) else ""))
    for r in defects:
        print(f"  {replay(r, args.seed)}  {r['found']}")
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1, default=str))
    if defects:
        return 1
    if unsent * 2 > len(runs):
        print(f"NO TEST: {unsent} of {len(runs)} runs sent no signal (each command had ended before its moment): they "
              "tested nothing; exit 2", file=sys.stderr, flush=True)
        return 2
    return 0


def replay(r: dict[str, Any], seed: int) -> str:
    """The ``--replay`` arguments that run ``r`` again: the same moment, or the seed's run (its fraction of the duration)."""
    again = f"--replay {r['command']}:{r['signal']}:{r['moment']}"
    return again + (f" (run {r['run']}: --seed {seed} --replay {r['run']})" if r.get("run") is not None else "")


if __name__ == "__main__":
    sys.exit(main())
