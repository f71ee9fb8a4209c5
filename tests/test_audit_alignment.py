"""Ways a cached target could be paired with the wrong sample, or a user mistake could end in a traceback:
each must stop with one line that names the cause and the fix (found by an audit of the alignment promise).

The ``numbered`` fixtures (tests/fixtures/numbered.py) make a pairing visible: item ``i``'s input is filled
with ``i`` and the ``echo`` teacher's logits are ``i + (0, 1, 2, 3)``.
"""

from __future__ import annotations

import pytest

import kdcache
from conftest import FIXTURES, NUMBERED
from kdcache import store as layout
from kdcache.cache import TransferSet
from kdcache.errors import PipelineError
from kdcache.pipeline import from_dict
from numbered import WrongCountGetitems

N = 100


def transfer(location: str, dataset, **kwargs) -> TransferSet:
    return TransferSet(location, dataset, [layout.LOGITS], batch_size=8, seed=3, **kwargs)


def numbered(**sections: dict) -> kdcache.Pipeline:
    """The ``numbered`` pipeline with a student, sections replaced or added."""
    raw = {**NUMBERED, "student": {"factory": "numbered.py:flat_student"},
           "train": {"epochs": 1, "batch_size": 8, "device": "cpu"}}
    return from_dict({**raw, **sections}, root=FIXTURES)


# ------------------------------------------------------------------ a batched __getitems__ that miscounts

@pytest.mark.parametrize("extra", [-1, 1], ids=["fewer", "more"])
def test_getitems_returning_another_number_of_items_is_named(numbered_store, extra):
    """Fewer items than rows was an IndexError traceback; more was a loss shape error blaming the student."""
    with pytest.raises(PipelineError, match=rf"__getitems__ returned {8 + extra} items for 8 indices"):
        list(transfer(numbered_store, WrongCountGetitems(extra)))


def test_extract_with_getitems_returning_too_few_items_is_an_error(tmp_path):
    """It was a store left incomplete without a word (exit status 0): no shard ever received all its rows."""
    with pytest.raises(PipelineError, match=r"__getitems__ returned 15 items for 16 indices.*one item per index"):
        kdcache.extract(from_dict({**NUMBERED, "data": {"factory": "numbered.py:one_item_short"}}, root=FIXTURES), str(tmp_path / "s.zarr"))
