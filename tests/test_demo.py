"""The embedded default end to end: `kdcache demo` in a real subprocess, its summary checked
against the targets of the transfer-set protocol (same budget for every student)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_meets_the_transfer_set_targets(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "kdcache.cli", "demo", "--out", str(out)], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    for key in ("teacher_accuracy", "baseline_accuracy", "student_accuracy", "full_label_accuracy", "gap_closed",
                "store", "extract_seconds", "train_seconds"):
        assert key in s, key
    teacher, a, b, c = s["teacher_accuracy"], s["baseline_accuracy"], s["student_accuracy"], s["full_label_accuracy"]
    assert teacher == pytest.approx(0.9905, abs=0.001)  # the pretrained teacher, measured from its own stored logits
    assert b - a >= 0.05, s  # distillation without labels beats 1,000 labels by 5+ points
    assert c - b <= 0.005, s  # and lands within half a point of all 50,000 labels
    assert s["gap_closed"] >= 0.75 and s["gap_closed"] == pytest.approx((b - a) / (teacher - a))
    assert s["teacher_params"] >= 10 * s["student_params"]
    students = s["students"]
    assert {students[k]["step"] for k in "ABC"} == {s["steps"]}  # the same number of steps for all three
    assert "teacher (pretrained CNN)" in result.stdout and "gap closed" in result.stdout
    # the demo used only the public CLI/API: its stores are ordinary complete stores
    info = subprocess.run([sys.executable, "-m", "kdcache.cli", "info", str(out / "teacher-train.zarr"), "--json"],
                          capture_output=True, text=True, check=True)
    summary = json.loads(info.stdout)
    assert summary["complete"] and summary["num_samples"] == 50_000
