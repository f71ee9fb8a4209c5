"""Journeys through the surroundings teams run kdcache in, the features ordinary: a store on a read-only mount, paths
through a link or with ``~`` the shell left alone, a file size limit (``ulimit -f``), two users at once. Each sample's
values name it (``tests/fixtures/journeys.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

import kdcache
from conftest import FIXTURES
from kdcache.cli import main

JOURNEYS = FIXTURES / "journeys.py"
REPO = Path(__file__).resolve().parents[1]

PIPELINE = f"""
[teacher]
factory = "{JOURNEYS}:teacher"
[data]
factory = "{JOURNEYS}:dataset"
[targets]
layers = ["body"]
[extract]
batch_size = 8
device = "cpu"
rows_per_shard = 16
threads = 1
[student]
factory = "{JOURNEYS}:student"
[train]
epochs = 1
batch_size = 16
lr = 1e-2
device = "cpu"
threads = 1
"""


@pytest.fixture
def pipeline(tmp_path: Path) -> Path:
    path = tmp_path / "p.toml"
    path.write_text(PIPELINE)
    return path


def invoke(*args: object) -> tuple[int, str]:
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exception is None or isinstance(r.exception, SystemExit), r.output  # one line, never a traceback
    return r.exit_code, r.output


@pytest.mark.parametrize("overwrite", [False, True], ids=["fresh", "overwrite"])
def test_a_store_folder_that_is_a_link_is_written_through_the_link(tmp_path: Path, pipeline: Path, overwrite: bool):
    """``runs/t.zarr -> /scratch/t.zarr``: extract into a linked empty folder (or --overwrite a linked store) failed with
    'Cannot call rmtree on a symbolic link; fix the cause and rerun the same command to resume'; it writes the folder the
    link leads to, the link kept."""
    real = tmp_path / "scratch" / "t.zarr"
    real.mkdir(parents=True)
    link = tmp_path / "t.zarr"
    link.symlink_to(real)
    if overwrite:
        kdcache.extract(kdcache.load_pipeline(pipeline), str(real))
    code, out = invoke("extract", pipeline, "--out", link, *(["--overwrite"] if overwrite else []))
    assert code == 0, out
    assert link.is_symlink() and (real / "zarr.json").is_file()
    code, out = invoke("verify", link)
    assert code == 0 and "verified: every check holds" in out, out
