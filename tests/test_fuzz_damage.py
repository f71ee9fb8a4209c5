"""tests/fuzz_damage.py's own logic kept from rotting: ``--minutes``, as fuzz_alignment's."""

from __future__ import annotations

import sys

import pytest

from conftest import FIXTURES

sys.path.insert(0, str(FIXTURES.parent))
import fuzz_damage  # noqa: E402  (tests/ on the path: the fuzzer is a script there)


@pytest.mark.slow  # two tiny stores extracted and one packed before the deadline is looked at
def test_minutes_starts_no_case_after_the_time_and_the_summary_says_how_many_were_not(tmp_path, capsys):
    """Measured from the start: the stores took longer than 6 ms to make, so no case ran; the summary says so."""
    assert fuzz_damage.main(["--minutes", "0.0001", "--only", "delete", "--no-train", "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "0 cases, 0 with a defect verdict; --minutes 0.0001 reached: " in out
    planned = int(out.split("reached: ")[1].split(" of ")[0])
    assert planned > 10 and f"{planned} of {planned} cases not run" in out  # every object's deletion, in each form
    assert (tmp_path / "r.json").read_text() == "[]"
