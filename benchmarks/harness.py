"""What every benchmark shares: arguments, timing (warm-up, median of repeats), goals, JSON.

Each benchmark measures its ratios within one run (numerator and denominator interleaved, so
machine noise hits both), prints them with PASS/FAIL against its goal, writes ``--out`` JSON,
and exits 1 on a FAIL when given ``--check``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))  # models.py, importable here and by pipeline import paths


def parser(description: str, repeats: int = 3) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--repeats", type=int, default=repeats, help=f"timed repeats per measurement (median reported; default {repeats})")
    p.add_argument("--out", default="", help="write the figures as JSON here")
    p.add_argument("--check", action="store_true", help="exit 1 if any goal is missed")
    p.add_argument("--workdir", default="", help="folder for stores and scratch files (default: a temp folder)")
    p.add_argument("--quick", action="store_true", help="smaller sizes (for a smoke test; figures are noisier)")
    return p


def add_extract_options(p: argparse.ArgumentParser) -> None:
    """The extract settings bench_extract and profile_extract share (resolved by ``extract_options``)."""
    p.add_argument("--batch-size", type=int, default=0, help="default: 64 on cpu, 256 on cuda")
    p.add_argument("--precision", default="", help="fp32 / bf16 / fp16 (default: fp32 on cpu, bf16 on cuda)")
    p.add_argument("--num-workers", type=int, default=-1, help="DataLoader workers (default: 0 on cpu, 8 on cuda)")
    p.add_argument("--compression", default="zstd", help="zstd (the default) or none")


def extract_options(args: argparse.Namespace) -> dict[str, Any]:
    """The ``[extract]`` values of ``add_extract_options``' flags, with the device's defaults where unset."""
    cuda = args.device.startswith("cuda")
    return {"batch_size": args.batch_size or (256 if cuda else 64), "precision": args.precision or ("bf16" if cuda else "fp32"),
            "num_workers": args.num_workers if args.num_workers >= 0 else (8 if cuda else 0), "compression": args.compression}


def workdir(args: argparse.Namespace) -> Path:
    """A fresh folder for the run's stores (under ``--workdir``, else the system's temp folder), removed when the
    process exits, Ctrl-C included (one bench_memory run writes ~450 MB)."""
    import atexit
    import shutil
    import tempfile

    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="kdcache-bench-", dir=args.workdir or None))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str = "cpu") -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, device: str = "cpu", warmup: int = 1,
                cleanup: Callable[[], Any] | None = None) -> list[dict[str, float]]:
    """Seconds of each function in each of ``repeats`` rounds (run round-robin, after ``warmup`` rounds).

    ``cleanup`` runs untimed after each function (e.g. deleting what it wrote, so every write is to new files).
    Take a ratio per round with ``median_of``: the functions of one round ran seconds apart, so a slow
    spell of the machine hits numerator and denominator alike.
    """
    rounds = []
    for r in range(warmup + repeats):
        times = {}
        for name, fn in fns.items():
            times[name] = timed(fn, device)
            if cleanup is not None:
                cleanup()
        if r >= warmup:
            rounds.append(times)
    return rounds


def median_of(rounds: list[dict[str, float]], figure: Callable[[dict[str, float]], float]) -> float:
    """The median over rounds of ``figure(one round's seconds by name)``."""
    return statistics.median(figure(r) for r in rounds)


def spread(rounds: list[dict[str, float]], figure: Callable[[dict[str, float]], float]) -> str:
    """``"rounds: lowest-highest"`` of ``figure`` over rounds, to print next to its median: how noisy it was."""
    values = [figure(r) for r in rounds]
    return f"(rounds: {min(values):.3f}-{max(values):.3f})"


class Report:
    """Figures and goals of one benchmark run."""

    def __init__(self, name: str, args: argparse.Namespace):
        self.name, self.args = name, args
        self.figures: dict[str, Any] = {}
        self.goals: list[dict[str, Any]] = []

    def figure(self, key: str, value: Any, note: str = "") -> None:
        value = value.item() if hasattr(value, "item") else value  # numpy scalars -> JSON-able
        self.figures[key] = value
        shown = f"{value:,.3f}" if isinstance(value, float) else str(value)
        print(f"  {key:<44} {shown}{'  ' + note if note else ''}", flush=True)

    def goal(self, what: str, value: float, op: str, target: float) -> bool:
        value = float(value)
        ok = bool(value >= target if op == ">=" else value <= target)
        self.goals.append({"what": what, "value": value, "op": op, "target": target, "pass": ok})
        print(f"{'PASS' if ok else 'FAIL'}: {what} = {value:.3f} (goal {op} {target:.3f})", flush=True)
        return ok

    def finish(self) -> None:
        ok = all(g["pass"] for g in self.goals)
        out = {"benchmark": self.name, "device": self.args.device, "repeats": self.args.repeats, "quick": self.args.quick,
               "host": {"python": platform.python_version(), "torch": torch.__version__, "cpus": _cpus(),
                        "gpu": torch.cuda.get_device_name() if self.args.device.startswith("cuda") else None},
               "figures": self.figures, "goals": self.goals, "pass": ok}
        if self.args.out:
            Path(self.args.out).write_text(json.dumps(out, indent=2) + "\n")
        print(f"{self.name}: {'PASS' if ok else 'FAIL'}", flush=True)
        if self.args.check and not ok:
            sys.exit(1)


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def mnist_pipeline(**sections: dict[str, Any]) -> Any:
    """pipelines/mnist.toml with per-section overrides (the real pretrained teacher and real data)."""
    import tomllib

    from kdcache.pipeline import from_dict

    raw = tomllib.loads((ROOT / "pipelines" / "mnist.toml").read_text())
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return from_dict(raw, root=ROOT / "pipelines", source="pipelines/mnist.toml")


def bench_pipeline(teacher: str, n: int, layers: list[str], device: str, **extract: Any) -> Any:
    """A pipeline over ``models.py``: a seeded synthetic teacher and ``n`` seeded synthetic images."""
    from kdcache.pipeline import from_dict

    raw = {
        "teacher": {"factory": f"models.py:{teacher}"},
        "data": {"factory": "models.py:images", "split": str(n)},
        "targets": {"logits": True, "layers": layers, "dtype": "float16"},
        "extract": {"device": device, **extract},
    }
    return from_dict(raw, root=HERE, source=f"benchmarks/models.py:{teacher}")
