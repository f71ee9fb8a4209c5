"""kdcache stats against a naive numpy computation over the same store."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from kdcache.cli import main
from kdcache.stats import stats
from kdcache.store import open_store
from reference import crash_at


def naive(location: str, rows: np.ndarray | None = None) -> dict:
    s = open_store(location)
    rows = np.arange(s.num_samples) if rows is None else rows
    logits = s.array("targets/logits")[:][rows].astype(np.float64)
    labels = s.array("samples/label")[:][rows]
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    correct = logits.argmax(1) == labels
    feats = s.array("targets/layers/features.3")[:][rows].astype(np.float64)
    return {
        "accuracy": correct.mean(),
        "entropy": float(-(p * np.log(p)).sum(1).mean()),
        "per_class": {str(c): correct[labels == c].mean() for c in np.unique(labels)},
        "mean": feats.mean(), "std": feats.std(),
    }


def test_stats_match_a_naive_computation(tiny_store):
    s, want = stats(tiny_store, num_workers=2), naive(tiny_store)
    assert s["rows"] == 50 and s["shards_done"] == 4 and s["labeled_rows"] == 50
    assert s["teacher_accuracy"] == pytest.approx(want["accuracy"])
    assert s["mean_entropy"] == pytest.approx(want["entropy"])
    assert {c: v["accuracy"] for c, v in s["per_class"].items()} == pytest.approx(want["per_class"])
    assert sum(v["count"] for v in s["per_class"].values()) == 50
    layer = s["layers"]["features.3"]
    assert layer["mean"] == pytest.approx(want["mean"]) and layer["std"] == pytest.approx(want["std"])


def test_stats_cover_only_done_shards(tmp_path, zoo_env):
    out = crash_at(tmp_path, zoo_env, 42, name="partial.zarr")
    s = stats(str(out))
    assert s["rows"] == 32 and s["shards_done"] == 2
    assert s["mean_entropy"] is not None and s["teacher_accuracy"] is not None


def test_cli_stats_human_and_json(tiny_store):
    r = CliRunner().invoke(main, ["stats", tiny_store, "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["rows"] == 50
    r = CliRunner().invoke(main, ["stats", tiny_store])
    assert r.exit_code == 0 and "top-1 accuracy" in r.output and "features.3" in r.output


def test_stats_read_whole_shards_checked_against_their_digests(tiny_store, tmp_path):
    """A block per shard: each read whole (one object), so a shard object swapped with another is named, not averaged in."""
    import shutil

    copy = tmp_path / "swapped.zarr"
    shutil.copytree(tiny_store, copy)
    logits = copy / "targets" / "logits" / "c"
    a, b = (logits / "0" / "0").read_bytes(), (logits / "1" / "0").read_bytes()
    (logits / "0" / "0").write_bytes(b)
    (logits / "1" / "0").write_bytes(a)
    r = CliRunner().invoke(main, ["stats", str(copy)])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    import re

    assert re.search(r"shard (0 of targets/logits \(rows 0-15\)|1 of targets/logits \(rows 16-31\)) holds other rows than its "
                     r"writer wrote there", r.output), r.output  # whichever of the two dask read first


def test_the_accuracy_says_over_how_many_labeled_rows(tmp_path):
    """Rows labeled below 0 (STL-10's 100k unlabeled of 105k) are left out of the accuracy: the text and --json say over how
    many rows it is (an accuracy over 5k of 105k rows read as the whole store's)."""
    from conftest import extract_tiny

    store = extract_tiny(tmp_path / "partly.zarr", "data.factory='tiny.py:partly_labelled'", "targets.layers=[]")
    labels = open_store(store).array("samples/label")[:]
    s = stats(store)
    assert s["labeled_rows"] == int((labels >= 0).sum()) == 25 and s["rows"] == 50
    assert s["teacher_accuracy"] == pytest.approx(naive_accuracy(store, labels >= 0))
    r = CliRunner().invoke(main, ["stats", store])
    assert r.exit_code == 0 and "against 25 labeled rows (of 50: rows labeled below 0 are left out)" in r.output, r.output
    assert json.loads(CliRunner().invoke(main, ["stats", store, "--json"]).output)["labeled_rows"] == 25
    unlabeled = extract_tiny(tmp_path / "unlabeled.zarr", "data.factory='numbered.py:tiny_unlabelled'", "targets.layers=[]")
    assert stats(unlabeled)["labeled_rows"] is None
    r = CliRunner().invoke(main, ["stats", unlabeled])  # it said "top-1 accuracy n/a against stored labels", of none
    assert r.exit_code == 0 and "teacher     top-1 accuracy n/a (the store holds no labels)\n" in r.output, r.output


def test_the_text_says_why_there_is_no_accuracy():
    """"top-1 accuracy n/a against stored labels" was said of every store without an accuracy: one with no labels (the
    text example's), with per-token or regression logits, or with no done shard. It says which."""
    from kdcache.stats import stats_text

    s = {"location": "s.zarr", "rows": 20, "shards_done": 1, "num_shards": 1, "teacher_accuracy": None, "labeled_rows": None,
         "mean_entropy": 1.0, "entropy_positions": 20, "logits_shape": [10], "per_class": None, "layers": {}}
    for changed, why in [({}, "the store holds no labels"),
                         ({"entropy_positions": 480, "logits_shape": [24, 10]}, "per-token logits: no one class per row"),
                         ({"logits_shape": [1, 10]}, "per-token logits: no one class per row"),  # one position: as many as rows
                         ({"mean_entropy": None, "entropy_positions": None, "logits_shape": []}, "no logits with a class axis"),
                         ({"rows": 0, "shards_done": 0, "mean_entropy": None, "entropy_positions": None}, "no done shards")]:
        assert f"teacher     top-1 accuracy n/a ({why})\n" in stats_text({**s, **changed}), changed


def naive_accuracy(location: str, rows: np.ndarray) -> float:
    s = open_store(location)
    return float((s.array("targets/logits")[:][rows].argmax(1) == s.array("samples/label")[:][rows]).mean())


def test_a_regression_teacher_has_no_entropy_or_accuracy(tmp_path):
    """Logits of one value per sample (a regression head) have no classes: no softmax across the rows for an entropy
    (it gave ln(N)-ish numbers), no top-1 accuracy; the layers' figures as ever."""
    from conftest import extract_tiny

    store = extract_tiny(tmp_path / "regression.zarr", "teacher.factory='bad_input.py:regression_teacher'", "targets.layers=['base.features.3']")
    s = stats(store)
    assert s["mean_entropy"] is None and s["teacher_accuracy"] is None and s["rows"] == 50 and "base.features.3" in s["layers"]
    r = CliRunner().invoke(main, ["stats", store])
    assert r.exit_code == 0 and "entropy     n/a (no logits with a class axis)" in r.output, r.output


def test_the_text_says_how_many_classes_it_leaves_out_and_why_there_is_no_entropy():
    """The text lists 50 classes: a teacher of 1,000 showed classes 0-49 as if they were all. A store with no done shard
    said 'no logits with a class axis' of logits that have one."""
    from kdcache.stats import stats_text

    s = {"location": "s.zarr", "rows": 2000, "shards_done": 2, "num_shards": 2, "teacher_accuracy": 0.5, "mean_entropy": 1.0,
         "per_class": {str(c): {"count": 2, "accuracy": 0.5} for c in range(1000)}, "layers": {}}
    text = stats_text(s)
    assert "49: 50.00% (n=2)  ... and 950 more classes (--json lists every one)" in text and "50: " not in text
    empty = stats_text({**s, "rows": 0, "shards_done": 0, "teacher_accuracy": None, "mean_entropy": None, "per_class": None})
    assert "entropy     n/a (no done shards)" in empty
    none_labeled = stats_text({**s, "teacher_accuracy": None, "labeled_rows": 0, "per_class": None})
    assert "top-1 accuracy n/a: none of the 2,000 rows has a label (every stored label is below 0)" in none_labeled


def test_the_entropy_of_per_token_logits_says_it_averages_every_stored_position(tmp_path):
    """Per-token logits ``[N, T, classes]`` (a text model's, unpooled) have one distribution per position, the padding's too
    (a store keeps no mask for unpooled targets): the figure was printed as if it were one per sample."""
    import kdcache
    from test_pooling import pooled

    location = tmp_path / "tokens.zarr"
    kdcache.extract(pooled(select={}, mask=""), location)
    logits = open_store(str(location)).array("targets/logits")[:].astype(np.float64)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    s = stats(str(location))
    assert s["mean_entropy"] == pytest.approx(float(-(p * np.log(p)).sum(-1).mean()))
    assert s["entropy_positions"] == logits.shape[0] * logits.shape[1] != s["rows"]
    r = CliRunner().invoke(main, ["stats", str(location)])
    assert r.exit_code == 0 and (f"nats of softmax(logits) over {s['entropy_positions']:,} positions of per-token logits (every "
                                 "stored position: padding included") in r.output, r.output


def test_labels_and_per_token_logits_of_one_position_say_why_there_is_no_accuracy(tiny_store, tmp_path):
    """Per-token logits ``[N, 1, classes]`` (one position: as many distributions as rows) of a store with labels said "top-1
    accuracy n/a (the store holds no labels)", told from the entropy's positions: it holds them. The logits' shape
    (``logits_shape``, per row) says it."""
    from conftest import extract_tiny

    store = extract_tiny(tmp_path / "one.zarr", "teacher.factory='bad_input.py:one_position_teacher'", "targets.layers=[]")
    assert open_store(store).array("targets/logits").shape == (50, 1, 4) and open_store(store).has_labels
    s = stats(store)
    assert s["logits_shape"] == [1, 4] and s["entropy_positions"] == s["rows"] == 50 and s["teacher_accuracy"] is None
    r = CliRunner().invoke(main, ["stats", store])
    assert r.exit_code == 0 and "teacher     top-1 accuracy n/a (per-token logits: no one class per row)\n" in r.output, r.output
    assert stats(tiny_store)["logits_shape"] == [4]


def test_the_entropy_of_logits_per_sample_is_over_the_rows(tiny_store):
    s = stats(tiny_store)
    assert s["entropy_positions"] == s["rows"] == 50
    r = CliRunner().invoke(main, ["stats", tiny_store])
    assert r.exit_code == 0 and "nats of softmax(logits)\n" in r.output, r.output


def test_per_class_accuracy_is_left_out_past_max_classes(tiny_store, monkeypatch):
    """Labels of ``MAX_CLASSES`` or more (a face or retrieval set of millions of identities) are not counted per class (a
    bincount as long as the largest label, in every task): the accuracy over all rows stays, per_class is None and the
    text says so (it said nothing of them)."""
    import kdcache.stats

    monkeypatch.setattr(kdcache.stats, "MAX_CLASSES", 3)  # tiny's labels are 0..3
    s, want = stats(tiny_store), naive(tiny_store)
    assert s["per_class"] is None and s["labeled_rows"] == 50
    assert s["teacher_accuracy"] == pytest.approx(want["accuracy"])
    r = CliRunner().invoke(main, ["stats", tiny_store])
    assert r.exit_code == 0 and "top-1 accuracy" in r.output, r.output
    assert "per class   n/a: a label reaches 3 or more, and that many classes are not counted one by one\n" in r.output, r.output
