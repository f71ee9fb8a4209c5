"""A seeded fuzzer of damaged stores: one damage at a time to one object of a real store, then every reading command.

Not part of the default suite (a few minutes on one core). Run from the repository root::

    python tests/fuzz_damage.py [--seed 0] [--flips 2] [--minutes M] [--only KIND ...] [--files GLOB] [--no-train]
                                [--json report.json]

The store is ``tests/fixtures/tiny.toml`` with ``targets.topk=3``: a top-k target (values and classes), a feature map,
labels, 4 shards of 16 rows (the last one partial), done markers and shard digests; a second store of the same layout
(``data.split=other``) supplies foreign shards; ``kdcache pack`` of the first the zip. Forms: ``folder`` (the store),
``old`` (the store as kdcache 0.1.0 wrote it, without digests), ``zip`` (the packed zip damaged in place: the zip's
CRC-32 no longer holds) and ``rezip`` (the damaged folder zipped again, every CRC-32 sound: a hostile sender). Each
damage is applied to a fresh copy, then ``verify``, ``info``, ``stats`` and a one-epoch ``train`` run in-process
(``CliRunner``, each under an alarm), and the store is read back whole through ``TransferSet`` (loaded and streamed)
to compare with the undamaged rows.

Outcomes, per command: ``ok`` (exit 0), ``error`` (exit 1, one ``Error:`` line or verify's report of problems),
``traceback`` (an exception that is not kdcache's, or several lines), ``hang`` (the alarm rang), ``differs`` (it
succeeded on rows or statistics other than the undamaged store's). A case is a defect when a command tracebacks or
hangs, when ``verify`` passes a store whose rows differ (``verify-missed``; ``silent`` where train or stats then
succeed on them), or when ``train`` succeeds on rows that differ where verify names the damage. Not defects:
``unchecked`` (verify passes, every row read is the undamaged one: damage in what verify documents it does not check,
the text of ``zarr.json`` objects, SHARING.md) and ``documented`` (another store's whole shard, digests and marker
included, which only the dataset's fingerprints tell apart, as train checks them; a shard moved in a store without
digests, whose positions are unchecked).

The cases run in order: the folder's, the old store's, the zip's, the rezipped folder's. ``--minutes M`` starts no case
after M minutes from the start (the summary says how many were not run). The seed draws the flipped and appended
bytes alone; a case is run again by the same ``--seed`` and ``--flips`` with ``--only KIND --files OBJECT`` (every
case's damage is drawn whatever is run).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import fnmatch
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
sys.path[:0] = [str(ROOT), str(FIXTURES)]

TOML = FIXTURES / "tiny.toml"
SETS = ["targets.topk=3"]
TIMEOUT_S = 60


class Hang(BaseException):
    """The alarm rang: a command ran longer than TIMEOUT_S (BaseException: no ``except Exception`` swallows it)."""


@contextlib.contextmanager
def alarm(seconds: int) -> Iterator[None]:
    def ring(signum: int, frame: Any) -> None:
        raise Hang(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, ring)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# ------------------------------------------------------------------------------------------------ the stores


def build(work: Path) -> tuple[Path, Path, Path]:
    """The store, another of the same layout (other samples) and the first packed."""
    import kdcache
    from kdcache.interop import pack

    a, b, z = work / "a.zarr", work / "b.zarr", work / "a.zarr.zip"
    kdcache.extract(kdcache.load_pipeline(TOML, SETS), str(a))
    kdcache.extract(kdcache.load_pipeline(TOML, [*SETS, "data.split=other"]), str(b))
    pack(str(a), str(z))
    return a, b, z


def read_back(location: str, budget_mb: float) -> dict[str, np.ndarray]:
    """Every row of the store as training reads it (``TransferSet``, store order): path -> values."""
    import kdcache
    import tiny

    ts = kdcache.TransferSet(location, tiny.dataset("train"), ["logits", "features.3"], batch_size=64, shuffle=False,
                             memory_budget_mb=budget_mb)
    columns: dict[str, list[np.ndarray]] = collections.defaultdict(list)
    for batch in ts:
        columns["rows"].append(batch["rows"].numpy())
        columns["index"].append(batch["index"].numpy())
        columns["label"].append(batch["label"].numpy())
        for path, t in batch["targets"].items():
            columns[path].append(t.numpy())
    return {k: np.concatenate(v) for k, v in columns.items()}


def same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    """Whether the rows read in ``a`` are those of ``b`` at their indices (``a`` may hold fewer: the done shards')."""
    if a.keys() != b.keys() or not np.isin(a["rows"], b["rows"]).all():
        return False
    at = np.searchsorted(b["rows"], a["rows"])
    return all(a[k].shape[1:] == b[k].shape[1:] and np.array_equal(a[k], b[k][at], equal_nan=True) for k in a)


# ------------------------------------------------------------------------------------------------ damages

Damage = Callable[[Path], None]  # applied to the object's path in a fresh copy of the store


def flip(at: int, bit: int) -> Damage:
    def damage(f: Path) -> None:
        data = bytearray(f.read_bytes())
        data[at] ^= 1 << bit
        f.write_bytes(bytes(data))
    return damage


def truncate(keep: Callable[[int], int]) -> Damage:
    def damage(f: Path) -> None:
        os.truncate(f, keep(f.stat().st_size))
    return damage


def append(extra: bytes) -> Damage:
    def damage(f: Path) -> None:
        with open(f, "ab") as out:
            out.write(extra)
    return damage


def delete(f: Path) -> None:
    f.unlink()


def directory(f: Path) -> None:
    f.unlink()
    f.mkdir()


def copied_from(source: Path) -> Damage:
    data = source.read_bytes()

    def damage(f: Path) -> None:
        f.write_bytes(data)
    return damage


def swapped_with(rel: str, partner: str) -> Damage:
    def damage(f: Path) -> None:
        other = f.parents[len(Path(rel).parts) - 1] / partner  # the same store's object ``partner``
        a, b = f.read_bytes(), other.read_bytes()
        f.write_bytes(b)
        other.write_bytes(a)
    return damage


def transplanted(other: Path, shard: int) -> Damage:
    """Every object of shard ``shard`` (each array's, its digest row and done marker) copied from ``other``: a shard
    consistent in itself, of other samples. Only the samples' fingerprints against the dataset can tell (train)."""
    def damage(root: Path) -> None:
        for f in other.rglob("*"):
            rel = f.relative_to(other).as_posix()
            where = shard_of(rel)
            if f.is_file() and where and where[1] == shard and (root / rel).exists():
                shutil.copyfile(f, root / rel)
    return damage


def shard_of(rel: str) -> tuple[str, int] | None:
    """(``array/c/`` prefix, shard number) of a chunk object's relative path, else None."""
    if "/c/" not in rel:
        return None
    array, key = rel.split("/c/", 1)
    return array, int(key.split("/")[0])


def damages(store: Path, other: Path, rng: random.Random, flips: int) -> Iterator[tuple[str, str, Damage]]:
    """(kind, object, damage) for every object of ``store``."""
    for f in sorted(p for p in store.rglob("*") if p.is_file()):
        rel, size = f.relative_to(store).as_posix(), f.stat().st_size
        for i in range(flips):
            yield "flip", rel, flip(rng.randrange(size), rng.randrange(8))
        if shard_of(rel) and size > 16:  # the shard index at the end: (offset, nbytes) per inner chunk and its crc32c
            yield "flip-index", rel, flip(size - 1 - rng.randrange(min(size, 36)), rng.randrange(8))
        yield "truncate-0", rel, truncate(lambda n: 0)
        yield "truncate-half", rel, truncate(lambda n: n // 2)
        yield "truncate-1", rel, truncate(lambda n: n - 1)
        yield "append", rel, append(rng.randbytes(rng.randrange(1, 40)))
        yield "delete", rel, delete
        yield "directory", rel, directory
        if (other / rel).exists() and (other / rel).read_bytes() != f.read_bytes():
            yield "foreign", rel, copied_from(other / rel)
        where = shard_of(rel)
        if rel == "zarr.json":
            for shard in range(4):
                yield "transplant", f"(shard {shard})", transplanted(other, shard)
        if where:
            array, s = where
            partner = f"{array}/c/{(s + 1) % 4}" + rel[len(f"{array}/c/{s}"):]
            if (store / partner).exists():
                yield "swap", rel, swapped_with(rel, partner)
                yield "duplicate", rel, copied_from(store / partner)


# ------------------------------------------------------------------------------------------------ running the commands


def run(args: list[str]) -> tuple[str, str]:
    """(outcome, its text) of ``kdcache ARGS`` in-process."""
    from click.testing import CliRunner
    from kdcache.cli import main

    try:
        with alarm(TIMEOUT_S):
            r = CliRunner().invoke(main, args)
    except Hang as e:
        return "hang", str(e)
    if r.exit_code == 0:
        return "ok", ""
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        import traceback

        return "traceback", "".join(traceback.format_exception(r.exception))[-1500:]
    errors = [line for line in r.stderr.splitlines() if line.strip()]
    if args[0] == "verify" and not errors:
        problems = [line.strip() for line in r.stdout.splitlines() if line.startswith(("FAIL", "  "))]
        return "error", " | ".join(problems)[:600]
    if len(errors) == 1 and errors[0].startswith("Error: ") and "Traceback" not in r.output:
        return "error", errors[0]
    return "traceback", r.output[-1500:]


def read(location: str, budget_mb: float) -> tuple[str, Any]:
    from kdcache.errors import KdcacheError

    try:
        with alarm(TIMEOUT_S):
            return "ok", read_back(location, budget_mb)
    except Hang as e:
        return "hang", str(e)
    except KdcacheError as e:
        return "error", str(e).splitlines()[0] if str(e) else type(e).__name__
    except Exception as e:  # noqa: BLE001 - what the fuzzer looks for
        return "traceback", f"{type(e).__name__}: {e}"[:600]


def stats_json(location: str) -> dict[str, Any] | None:
    from click.testing import CliRunner
    from kdcache.cli import main

    with alarm(TIMEOUT_S):
        r = CliRunner().invoke(main, ["stats", location, "--json"])
    if r.exit_code != 0:
        return None
    s = json.loads(r.stdout)
    s.pop("location", None)
    return s


def case(location: str, work: Path, reference: dict[str, Any], train: bool, kind: str, form: str) -> dict[str, Any]:
    """Run every command on the damaged store at ``location``; the outcomes and the case's verdicts."""
    out: dict[str, Any] = {}
    for verb in ("verify", "info", "stats"):
        out[verb] = run([verb, location])
    if train:
        out["train"] = run(["train", str(TOML), "--cache", location, "--out", str(work / "run"), "--epochs", "1",
                            *[x for s in SETS for x in ("--set", s)], "--overwrite"])
    for budget, name in ((2048.0, "read"), (0.0, "stream")):
        outcome, rows = read(location, budget)
        out[name] = (outcome, "" if outcome == "ok" else rows)
        if outcome == "ok" and not same(rows, reference["rows"]):
            out[name] = ("differs", "rows differ from the undamaged store's")
    if out["stats"][0] == "ok":
        try:
            s = stats_json(location)
        except Hang:
            s = None
        if s is not None and s != reference["stats"] and s["shards_done"] == reference["stats"]["shards_done"]:
            out["stats"] = ("differs", "statistics differ from the undamaged store's, every shard done")
    out["verdicts"] = verdicts(out, kind, form)
    return out


def verdicts(out: dict[str, Any], kind: str, form: str) -> list[str]:
    """The case's findings: ``unchecked`` and ``documented`` are no defect (see the module's docstring)."""
    found = [f"{verb}: {outcome}" for verb, (outcome, _) in out.items() if outcome in ("traceback", "hang")]
    differs = any(out[name][0] == "differs" for name in ("read", "stream", "stats"))
    trained = "train" in out and out["train"][0] == "ok"
    if out["verify"][0] != "ok":  # verify names the damage: train must still refuse rows that differ
        return found + (["train: trained on rows verify names"] if trained and differs else [])
    if not differs:
        return found + ["unchecked"]
    if kind == "transplant" or (form == "old" and kind in ("swap", "duplicate", "foreign")):
        return found + ["documented"]  # verify has no dataset, nor digests before 0.1.1 (SHARING.md)
    return found + ["verify-missed"] + (["train: silent"] if trained else []) + (["stats: silent"] if out["stats"][0] == "differs" else [])


# ------------------------------------------------------------------------------------------------ zips


def before_digests(store: Path, out: Path) -> Path:
    """A copy of ``store`` as kdcache 0.1.0 wrote it (no ``progress/digest``, no ``compression.shard_digests``): readable
    as is, its shards' places unchecked."""
    shutil.copytree(store, out)
    shutil.rmtree(out / "progress" / "digest")
    meta = json.loads((out / "zarr.json").read_text())
    del meta["attributes"]["kdcache"]["compression"]["shard_digests"]
    (out / "zarr.json").write_text(json.dumps(meta, indent=2))
    return out


def rezip(folder: Path, out: Path) -> None:
    """The folder as ``kdcache pack`` writes it: stored members, sorted."""
    with zipfile.ZipFile(out, "w") as z:
        for f in sorted(p for p in folder.rglob("*") if p.is_file()):
            z.write(f, f.relative_to(folder).as_posix(), compress_type=zipfile.ZIP_STORED)


def zip_damages(packed: Path, rng: random.Random, flips: int) -> Iterator[tuple[str, str, Damage]]:
    """Damage to the zip file itself: a member's bytes in place (the zip's CRC-32 no longer holds), its end."""
    with zipfile.ZipFile(packed) as z:
        members = [(i.filename, i.header_offset, i.compress_size) for i in z.infolist()]
    size = packed.stat().st_size
    for name, offset, length in members:
        header = 30 + len(name.encode())
        if length:
            yield "zip-flip-member", name, flip(offset + header + rng.randrange(length), rng.randrange(8))
        yield "zip-flip-header", name, flip(offset + rng.randrange(header), rng.randrange(8))
    cd = max(o + 30 + len(n.encode()) + c for n, o, c in members)
    for i in range(flips * 4):
        yield "zip-flip-directory", "(central directory)", flip(cd + rng.randrange(size - cd), rng.randrange(8))
    yield "zip-truncate-half", "(zip)", truncate(lambda n: n // 2)
    yield "zip-truncate-1", "(zip)", truncate(lambda n: n - 1)
    yield "zip-truncate-0", "(zip)", truncate(lambda n: 0)
    yield "zip-append", "(zip)", append(rng.randbytes(rng.randrange(1, 40)))


# ------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--flips", type=int, default=2, help="seeded byte flips per object")
    p.add_argument("--minutes", type=float, default=0.0, help="start no case after this many minutes (0: no limit)")
    p.add_argument("--only", nargs="*", help="damage kinds to run (default: all)")
    p.add_argument("--files", default="*", help="glob of the objects damaged (relative paths)")
    p.add_argument("--no-train", action="store_true")
    p.add_argument("--no-zip", action="store_true")
    p.add_argument("--json", help="write every case here")
    args = p.parse_args(argv)
    args.deadline = time.monotonic() + args.minutes * 60 if args.minutes else float("inf")
    import torch

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="kdcache-fuzz-"))
    try:
        return fuzz(work, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def fuzz(work: Path, args: argparse.Namespace) -> int:
    a, b, packed = build(work)
    reference = {"rows": read_back(str(a), 2048.0), "stats": stats_json(str(a))}
    assert same(read_back(str(packed), 0.0), reference["rows"])
    old = before_digests(a, work / "old.zarr")
    rng = random.Random(args.seed)
    plans: list[tuple[str, str, str, Damage]] = [("folder", *d) for d in damages(a, b, rng, args.flips)]
    plans += [("old", *d) for d in damages(old, b, rng, args.flips)]
    if not args.no_zip:
        plans += [("zip", *d) for d in zip_damages(packed, rng, args.flips)]
        plans += [("rezip", *d) for d in damages(a, b, rng, args.flips) if d[0] != "directory"]
    plans = [x for x in plans if (not args.only or x[1] in args.only) and fnmatch.fnmatch(x[2], args.files)]
    tally: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    cases = []
    for n, (form, kind, rel, damage) in enumerate(plans):
        if time.monotonic() > args.deadline:
            break
        location = damaged(work, old if form == "old" else a, packed, form, rel, damage)
        out = case(str(location), work, reference, not args.no_train, kind, form)
        shutil.rmtree(work / "case", ignore_errors=True)
        label = f"{form}:{kind}"
        tally[label]["cases"] += 1
        for verb in ("verify", "info", "stats", "train", "read", "stream"):
            if verb in out:
                tally[label][f"{verb}={out[verb][0]}"] += 1
        for v in out["verdicts"]:
            tally[label][v] += 1
        cases.append({"form": form, "kind": kind, "object": rel, **out})
        if any(v not in ("unchecked", "documented") for v in out["verdicts"]):
            print(f"[{n + 1}/{len(plans)}] {label} {rel}: {out['verdicts']}", flush=True)
            for verb in ("verify", "info", "stats", "train", "read", "stream"):
                if verb in out and out[verb][0] != "ok":
                    print(f"    {verb}: {out[verb][0]}: {str(out[verb][1])[-400:]}", flush=True)
    print(json.dumps({k: dict(v) for k, v in tally.items()}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(cases, indent=1, default=str))
    defects = [c for c in cases if any(v not in ("unchecked", "documented") for v in c["verdicts"])]
    print(f"{len(cases)} cases, {len(defects)} with a defect verdict"
          + (f"; --minutes {args.minutes:g} reached: {len(plans) - len(cases)} of {len(plans)} cases not run" if len(cases) < len(plans) else ""))
    return 1 if defects else 0


def damaged(work: Path, a: Path, packed: Path, form: str, rel: str, damage: Damage) -> Path:
    """A fresh copy of the store ``a`` (``form``: the folder, the packed zip, or a zip of the damaged folder; ``old``: the
    folder ``a`` is the store without digests) with ``damage`` done."""
    here = work / "case"
    shutil.rmtree(here, ignore_errors=True)
    here.mkdir()
    if form == "zip":
        out = here / "z.zarr.zip"
        shutil.copyfile(packed, out)
        damage(out)
        return out
    folder = here / "s.zarr"
    shutil.copytree(a, folder)
    damage(folder if rel.startswith("(") else folder / rel)  # "(shard 1)": the whole store's
    if form in ("folder", "old"):
        return folder
    out = here / "r.zarr.zip"
    rezip(folder, out)
    return out


if __name__ == "__main__":
    sys.exit(main())
