"""The text example (``pipelines/text.toml``): a transformer LM's per-token logits and mean-pooled sentence feature, extracted
from padded batches and distilled through the CLI, as README's *Distilling a text model (padded batches)* shows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from click.testing import CliRunner

import kdcache
from kdcache.cli import main

TEXT = str(Path(__file__).resolve().parent.parent / "pipelines" / "text.toml")


def cli(*args: str) -> None:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output


def pooled(location: Path) -> np.ndarray:
    store = kdcache.open_store(str(location))
    return store.array(store.targets["final_norm"].path)[:].astype(np.float32)  # (sentences, 32)


def test_the_text_example_extracts_and_trains_through_the_cli_with_its_padding_masked(tmp_path):
    """The manifest records the mask the sentence feature was pooled by; train leaves the padding out (train.mask) and its
    losses fall. The same sentences padded to 40 positions, extracted in batches of 7, store the same pooled features
    (each sentence's own tokens), which a mean over every position, padding included, does not."""
    cli("extract", TEXT, "--out", str(tmp_path / "text.zarr"))
    manifest = kdcache.open_store(str(tmp_path / "text.zarr")).manifest
    assert {name: t.get("mask") for name, t in manifest["targets"].items()} == {"logits": None, "final_norm": "attention_mask"}

    cli("train", TEXT, "--cache", str(tmp_path / "text.zarr"), "--out", str(tmp_path / "run"))
    assert json.loads((tmp_path / "run" / "pipeline.json").read_text())["train"]["mask"] == "attention_mask"
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for term in ("loss", "loss_kl", "loss_feat:final_norm"):
        losses = [line[term] for line in lines]
        assert len(losses) == 3 and np.all(np.isfinite(losses)) and losses[-1] < losses[0], (term, losses)

    wider = ["--batch-size", "7", "--set", "data.factory=text.py:dataset_padded_wider"]
    cli("extract", TEXT, "--out", str(tmp_path / "wider.zarr"), *wider)
    np.testing.assert_allclose(pooled(tmp_path / "wider.zarr"), pooled(tmp_path / "text.zarr"), rtol=2e-3, atol=2e-3)
    cli("extract", TEXT, "--out", str(tmp_path / "unmasked.zarr"), *wider, "--set", "targets.mask=''")
    assert np.abs(pooled(tmp_path / "unmasked.zarr") - pooled(tmp_path / "text.zarr")).max() > 0.1
