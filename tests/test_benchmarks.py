"""The benchmarks still run: each at a tiny size, its JSON holding every figure and goal it prints.

Their verdicts are not asserted (CI's machine is not the one the goals are for, and tiny sizes are noise); that they
finish, measure and decide is. A benchmark that no longer runs (bench_writer's store was refused as damaged for a
while, unseen, and ``benchmarks/gpu_check.sh`` runs it on the one GPU session a task may get) fails here.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
TINY = {  # script: arguments for a run of a few seconds (the others extract real MNIST or a ResNet's maps: a minute each)
    "bench_writer.py": ["--n", "64"],
    "bench_digest.py": ["--n", "64"],
    "bench_pooling.py": ["--quick", "--steps", "2"],  # the text LM at width 64, 32 tokens, batch 16
}


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(TINY))
def test_a_benchmark_runs_to_its_verdict(script, tmp_path):
    out = tmp_path / "figures.json"
    proc = subprocess.run([sys.executable, str(BENCHMARKS / script), *TINY[script], "--repeats", "1", "--workdir", str(tmp_path / "work"),
                           "--out", str(out)], capture_output=True, text=True, timeout=240, cwd=BENCHMARKS.parent)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["goals"] and report["figures"], report
    for goal in report["goals"]:
        assert math.isfinite(goal["value"]) and goal["pass"] in (True, False), goal
        assert f"{'PASS' if goal['pass'] else 'FAIL'}: {goal['what']} = " in proc.stdout
    assert all(not isinstance(v, float) or math.isfinite(v) for v in report["figures"].values()), report["figures"]
    assert proc.stdout.rstrip().endswith(f"{report['benchmark']}: {'PASS' if report['pass'] else 'FAIL'}")


@pytest.mark.slow
def test_the_request_counter_counts_every_command_over_both_servers():
    """benchmarks/count_requests.py (RESULTS.md's requests per command, counted at a real http server and moto's S3 on
    loopback) still runs: every command succeeds and sends requests of each server's kinds; train's start stays as
    bounded as tests/test_remote.py bounds it over http."""
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "count_requests.py"), str(BENCHMARKS.parent)], capture_output=True,
                          text=True, timeout=300, cwd=BENCHMARKS.parent)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    counts = json.loads(proc.stdout.splitlines()[-1])
    commands = ("info", "verify", "stats", "train", "train-stream", "export")
    assert sorted(counts) == sorted(f"{server} {c}" for server in ("http", "s3") for c in commands), counts
    assert all(c["GET"] > 0 and c["total"] == sum(n for k, n in c.items() if k != "total") for c in counts.values()), counts
    assert counts["http train"]["total"] < 53 and counts["http train-stream"]["total"] < 69, counts  # before: 53 and 69


DEVICE_RUN = {  # gpu_check.sh's CUDA scripts, at a tiny size on the CPU: what they call must still exist and answer as they read it
    "gpu_extract.py": ["--device", "cpu", "--n", "64"],
    "profile_extract.py": ["--device", "cpu", "--n", "16", "--batch-size", "16"],  # one full batch: its ResNet forward is the time
}


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(DEVICE_RUN))
def test_a_script_of_the_device_run_runs_on_the_cpu(script, tmp_path):
    """gpu_check.sh runs these once, on a borrowed GPU with minutes of device time: a crash there (gpu_extract.py read
    the probe batch's targets after setup had freed them) costs the whole check, so they are run here at a tiny size."""
    out = tmp_path / "figures.json"
    proc = subprocess.run([sys.executable, str(BENCHMARKS / script), *DEVICE_RUN[script], "--workdir", str(tmp_path / "work"),
                           "--out", str(out)], capture_output=True, text=True, timeout=240, cwd=BENCHMARKS.parent)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    if script == "gpu_extract.py":
        assert report["pass"] and report["complete"] and report["host_copies_equal_device_values"], report
    else:
        assert report["stages"] and report["wall_s"] > 0, report


@pytest.mark.skipif(shutil.which("bash") is None or torch.cuda.is_available(), reason="needs bash, and a machine without CUDA")
def test_the_device_run_stops_at_once_without_cuda(tmp_path):
    """Without CUDA tests/test_gpu.py skips every test and exits 0, and each benchmark fails after its setup: gpu_check.sh
    says so and stops in seconds, not after minutes of steps that can only fail or pass nothing."""
    proc = subprocess.run(["bash", str(BENCHMARKS / "gpu_check.sh")], capture_output=True, text=True, timeout=120,
                          cwd=BENCHMARKS.parent, env={**os.environ, "OUT": str(tmp_path / "out")})
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "gpu_check.sh: CUDA is not available here" in proc.stdout
    assert "=== tests" not in proc.stdout  # no step ran
