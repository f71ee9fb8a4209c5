"""Feature distillation with real architectures (attention blocks, sequence-first encoders, BatchNorm students,
named-output teachers, token taggers): extract a tiny store, then train or set up a student from it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import architectures
import kdcache
from conftest import FIXTURES
from kdcache import store as layout
from kdcache.errors import ModelError, PipelineError, ShapeMismatchError, TargetError
from kdcache.pipeline import from_dict
from kdcache.train import setup


def pipeline(teacher: str = "blocks_teacher", student: str = "blocks_student", data: str = "images", *, layers: tuple[str, ...] = (),
             select: dict[str, str] | None = None, features: dict | None = None, loss: dict | None = None, **train) -> kdcache.Pipeline:
    raw = {"teacher": {"factory": f"architectures.py:{teacher}"}, "data": {"factory": f"architectures.py:{data}"},
           "targets": {"layers": list(layers), "dtype": "float32", "select": select or {}},
           "extract": {"batch_size": 8, "device": "cpu", "rows_per_shard": 8},
           "student": {"factory": f"architectures.py:{student}"},
           "train": {"epochs": 1, "batch_size": 8, "device": "cpu", "features": features or {}, "loss": loss or {}, **train}}
    return from_dict(raw, root=FIXTURES)


def extracted(p: kdcache.Pipeline, tmp_path: Path) -> layout.Store:
    kdcache.extract(p, str(tmp_path / "teacher.zarr"))
    return layout.open_store(str(tmp_path / "teacher.zarr"))


def batch_of(store: layout.Store, paths: list[str], rows: int = 8) -> dict:
    data = architectures.images()
    return {"inputs": torch.stack([data[i][0] for i in range(rows)]), "label": data.y[:rows].clone(),
            "targets": {path: torch.from_numpy(store.read(path, 0, rows)) for path in paths}}


def test_an_output_without_a_known_key_lists_its_keys(tmp_path):
    p = pipeline(teacher="named_outputs_teacher")
    with pytest.raises(TargetError, match=r"output of type dict.*keys: 'out', 'aux'.*\[targets.select\] 'logits'"):
        kdcache.extract(p, str(tmp_path / "teacher.zarr"))
    assert extracted(pipeline(teacher="named_outputs_teacher", select={"logits": "out"}), tmp_path).targets
