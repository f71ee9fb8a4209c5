"""tests/fuzz_signals.py's own logic kept from rotting: its moments drawn from durations measured as the campaign goes
(a duration measured once, on a loaded machine, put 58 of seed 11's 150 moments after the command had ended), the
runs that sent no signal counted, ``--minutes``. Its runs are real ``kdcache verify`` processes of a tiny store."""

from __future__ import annotations

import argparse
import json
import random
import sys
import time

import pytest

from conftest import FIXTURES

sys.path.insert(0, str(FIXTURES.parent))
import fuzz_signals  # noqa: E402  (tests/ on the path: the fuzzer is a script there)

pytestmark = pytest.mark.slow  # kdcache processes: extract, export and verify for the references, then verify's runs


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """The uninterrupted runs the fuzzer starts with (extract, export, verify), as it makes them."""
    return fuzz_signals.references(tmp_path_factory.mktemp("sigfuzz"), "kdcache", ["verify"])


def args(tmp_path, **kw):
    return argparse.Namespace(**{"seed": 0, "jobs": 1, "entry": "kdcache", "late": 15.0, "lost": 2.0, "minutes": 0.0,
                                 "json": str(tmp_path / "runs.json"), **kw})


def test_moments_are_drawn_from_the_durations_the_runs_measure_not_from_the_first_alone(ref, tmp_path, capsys):
    """The first duration 600 s (measured on a machine far slower than now): the runs at a tenth of it end before their
    moment, no signal sent, each run's whole duration measured; the runs after them are stopped a tenth of the way in
    (unless one ran ten times as fast as the slower of the two before it)."""
    first = dict(ref, seconds={**ref["seconds"], "verify": 600.0})
    plans = [fuzz_signals.Plan(n, "verify", fuzz_signals.signal.SIGTERM, 0.1) for n in range(4)]
    assert fuzz_signals.fuzz(plans, first, args(tmp_path)) == 0
    runs = sorted(json.loads((tmp_path / "runs.json").read_text()), key=lambda r: r["run"])
    assert [r["sent"] is None for r in runs] == [True, True, False, False], runs
    assert [r["outcome"] for r in runs[:2]] == ["not sent", "not sent"]
    assert runs[0]["estimate"] == 600.0 and runs[2]["estimate"] == round(max(runs[0]["took"], runs[1]["took"]), 3)
    assert runs[2]["moment"] == pytest.approx(runs[2]["estimate"] / 10, abs=0.001) and runs[2]["sent"] < runs[2]["took"]
    assert all(r["found"] == [] for r in runs), runs
    out = capsys.readouterr().out
    assert "4 runs, 0 with a defect; the signal sent in 2, not in 2 (the command had ended before its moment)" in out


def test_a_campaign_where_most_runs_sent_no_signal_says_so_and_exits_2(ref, tmp_path, capsys):
    """Moments replayed past the command's end: nothing was tested, which the exit status and stderr say."""
    plans = [fuzz_signals.Plan(None, "verify", fuzz_signals.signal.SIGINT, None, 120.0) for _ in range(2)]
    assert fuzz_signals.fuzz(plans, ref, args(tmp_path)) == 2
    out, err = capsys.readouterr()
    assert "2 runs, 0 with a defect; the signal sent in 0, not in 2" in out
    assert "NO TEST: 2 of 2 runs sent no signal" in err


def test_a_command_stopped_in_every_run_is_timed_again(ref):
    """Durations too short (a faster machine's): every run is stopped, none measures the command; after REMEASURE of
    them an uninterrupted run is timed, and the moments are drawn from its duration again."""
    durations = fuzz_signals.Durations({"verify": 0.01})
    for _ in range(fuzz_signals.Durations.REMEASURE - 1):
        durations.ran("verify", 0.005, 0.9, 143)
    assert not durations.stale("verify")
    durations.ran("verify", 0.005, 0.9, 143)
    assert durations.stale("verify")
    fuzz_signals.retime("verify", ref, "kdcache", durations)
    assert durations.retimed == 1 and not durations.stale("verify")
    assert list(durations.recent["verify"])[0] == 0.01 and durations.estimate("verify") > 0.1  # a process's start at least


def test_minutes_starts_no_run_after_the_time_and_the_summary_says_how_many_were_not(ref, tmp_path, capsys):
    # each signal at half the command's time: seed 0's first run draws 4 % (21 ms), which lands, on an idle box, in
    # Python's import of the kdcache package, before the program's handler (a known window: its traceback is a defect,
    # exit 1); this test is of --minutes, not of that window
    plans = [plan._replace(fraction=0.5) for plan in fuzz_signals.draw(0, 20, ["verify"], ["TERM", "INT"])]
    assert fuzz_signals.fuzz(plans, ref, args(tmp_path, minutes=0.005), deadline=time.monotonic() + 0.3) in (0, 2)
    ran = len(json.loads((tmp_path / "runs.json").read_text()))
    assert 1 <= ran < 20  # the first starts at once; a kdcache process takes longer than 0.3 s / 19
    assert f"; --minutes 0.005 reached: {20 - ran} of 20 runs not started" in capsys.readouterr().out


def test_minutes_on_the_command_line(tmp_path, capsys):
    """``--minutes`` as fuzz_alignment's: measured from the start (the references took longer than 6 ms: no run)."""
    assert fuzz_signals.main(["--only", "verify", "--runs", "30", "--minutes", "0.0001", "--json", str(tmp_path / "r.json")]) == 0
    assert "0 runs, 0 with a defect; the signal sent in 0, not in 0 (the command had ended before its moment); " \
        "--minutes 0.0001 reached: 30 of 30 runs not started" in capsys.readouterr().out


def test_a_seeds_runs_are_those_it_drew_before_and_replay_names_one():
    """The seed draws a fraction of the duration where it drew seconds: the same commands, signals and (at the first
    duration) moments as the campaigns that ran before; ``--replay N`` is the seed's run N, CMD:SIG:MOMENT a moment."""
    seconds = {"train": 9.5, "extract": 4.25, "pack": 1.5, "export": 2.0, "import": 3.0, "verify": 1.0}
    rng = random.Random(11)
    before = []
    for _ in range(150):  # what fuzz_signals drew at 2c32f61
        command = rng.choice(list(fuzz_signals.COMMANDS))
        before.append((command, fuzz_signals.SIGNALS[rng.choice(["TERM", "INT"])], rng.uniform(0, seconds[command] * 1.05)))
    now = fuzz_signals.draw(11, 150, list(fuzz_signals.COMMANDS), ["TERM", "INT"])
    assert [(p.command, p.signum) for p in now] == [(c, s) for c, s, _ in before]
    assert [p.fraction * seconds[p.command] for p in now] == pytest.approx([m for _, _, m in before], abs=1e-9)
    assert fuzz_signals.parse_replay("17") == (17, None, None, None)
    assert fuzz_signals.parse_replay("export:TERM:0.256") == (None, "export", fuzz_signals.signal.SIGTERM, 0.256)
    with pytest.raises(SystemExit, match=r"--replay 'export:KILL:1': expected a run's number \(N\) or CMD:SIG:MOMENT"):
        fuzz_signals.parse_replay("export:KILL:1")
    with pytest.raises(SystemExit, match=r"the moment 'soon' is not a number of seconds >= 0"):
        fuzz_signals.parse_replay("pack:INT:soon")
