"""kdcache.train against real stores of the tiny fixture: a student learns from the store alone.

Stores are extracted once per session (conftest) and never modified; a test that needs a broken
store copies one first. Steps are observed by wrapping ``Run.losses`` (the real method still runs).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import importlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr
from click.testing import CliRunner
from torch.utils.data import default_collate

import kdcache
import tiny
from conftest import FIXTURES, TINY_TOML, extract_tiny, served_folder
from reference import signal_and_wait, train_cut_after_first_epoch
from kdcache import cache, cli, data, losses, store as layout
from kdcache.cache import TransferSet
from kdcache.errors import AlignmentError, DataError, PipelineError, ShapeMismatchError, StoreError, TrainingError
from kdcache.train import CHECKPOINT, Run, train

PLAIN = ["train.features={}", "train.eval_split=''"]  # no feature loss, no eval: the quickest run


def pipeline(*overrides: str) -> kdcache.Pipeline:
    return kdcache.load_pipeline(TINY_TOML, list(overrides))


@pytest.fixture(scope="module")
def test_store(tmp_path_factory) -> str:
    """The tiny teacher over the test split (for train.eval_cache)."""
    return extract_tiny(tmp_path_factory.mktemp("stores") / "tiny-test.zarr", 'data.split="test"')


@pytest.fixture(scope="module")
def store32(tmp_path_factory) -> str:
    """Logits only, float32."""
    return extract_tiny(tmp_path_factory.mktemp("stores") / "tiny32.zarr", 'targets.dtype="float32"', "targets.layers=[]")


@pytest.fixture
def steps(monkeypatch) -> list[dict]:
    """One entry per optimizer step of any train() in the test: the rows used and the loss terms."""
    seen: list[dict] = []
    losses_of = Run.losses

    def recording(self, batch):
        parts = losses_of(self, batch)
        seen.append({"rows": batch["rows"].numpy().copy(), "loss": float(sum(parts.values()).detach()), "parts": sorted(parts)})
        return parts

    monkeypatch.setattr(Run, "losses", recording)
    return seen


@pytest.fixture
def graded(monkeypatch) -> list[dict]:
    """One entry per optimizer step of any train() in the test: its batch, the weighted loss terms, the student's and heads'
    parameters before the step ("heads:" + the heads' own names) and the gradient of the step's loss with respect to each."""
    seen: list[dict] = []
    losses_of = Run.losses

    def recording(self, batch):
        named = [*self.student.named_parameters(), *(("heads:" + k, v) for k, v in self.heads.named_parameters())]
        before = {k: v.detach().clone() for k, v in named}
        parts = losses_of(self, batch)
        grads = torch.autograd.grad(sum(parts.values()), [v for _, v in named], retain_graph=True)  # the step's own backward follows
        seen.append({"batch": batch, "parts": {k: float(v.detach()) for k, v in parts.items()}, "params": before,
                     "grads": {k: g for (k, _), g in zip(named, grads)}})
        return parts

    monkeypatch.setattr(Run, "losses", recording)
    return seen


def row_means(per_position: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A reference of a masked term: each row's mean over its valid positions, one by one, then the mean over the rows."""
    return torch.stack([row[keep].mean() for row, keep in zip(per_position, mask.bool())]).mean()


def same_as_reference(step: dict, reference: dict[str, torch.Tensor], params: dict[str, torch.Tensor]) -> None:
    """The step's weighted loss terms are ``reference``'s (float64), and its gradients those of their sum with respect to
    ``params``: to float32's precision (README: kl's absolute error is of order 1e-5 where T² · ln(classes) <= 1000, the
    difference of two log-probabilities near -ln(classes) rounded; its gradient, p_s - p_t, of two nearly equal floats)."""
    assert step["parts"] == pytest.approx({k: float(v.detach()) for k, v in reference.items()}, rel=1e-5, abs=1e-5)
    want = dict(zip(params, torch.autograd.grad(sum(reference.values()), list(params.values()))))
    assert want.keys() == step["grads"].keys()
    for name, grad in want.items():  # relative to the largest entry
        assert (step["grads"][name].double() - grad).abs().max() <= 1e-4 * grad.abs().max() + 1e-12, name


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def copy_store(location: str, tmp_path: Path) -> str:
    copy = str(tmp_path / "copy.zarr")
    shutil.copytree(location, copy)
    return copy


# ------------------------------------------------------------------------------------------ teacher


def test_teacher_is_never_imported(tiny_store, test_store, tmp_path):
    bomb = FIXTURES / "exploding_teacher.py"
    p = pipeline('teacher.factory="exploding_teacher.py:teacher"', f'train.eval_cache="{test_store}"')
    result = train(p, tiny_store, tmp_path / "run")
    assert result["epoch"] == 1 and "eval_agreement" in result
    assert "exploding_teacher" not in sys.modules
    assert not any(getattr(m, "__file__", None) and Path(m.__file__).resolve() == bomb for m in list(sys.modules.values()))
    with pytest.raises(PipelineError, match="importing it raised RuntimeError: kdcache train imported the teacher"):  # it really explodes
        p.resolve(p.teacher.factory)


# ---------------------------------------------------------------------------------------- alignment


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        ("tiny_reversed", r"dataset index 0 \(its fingerprint is in the manifest\)"),  # checked before the first batch
        ("tiny_modified", r"store row 17 \(dataset index 17\)"),
    ],
)
@pytest.mark.parametrize("budget", [2048, 0], ids=["memory", "stream"])
def test_changed_dataset_is_an_alignment_error(tiny_store, tmp_path, factory, match, budget):
    p = pipeline(*PLAIN, f'data.factory="numbered.py:{factory}"', f"train.memory_budget_mb={budget}")
    with pytest.raises(AlignmentError, match=match):
        train(p, tiny_store, tmp_path / "run")
    assert not (tmp_path / "run" / "student.pt").exists()


def gone_once_under_way(monkeypatch, lost: Path) -> None:
    """Have the file ``lost`` deleted as the run's epochs begin: a done shard's object gone after train's look at the
    store's objects (``_check_objects``), which refuses a store already lacking it."""
    module = importlib.import_module("kdcache.train")  # kdcache.train is the function
    epochs = module._epochs

    def deleting(*args, **kwargs):
        lost.unlink()
        return epochs(*args, **kwargs)

    monkeypatch.setattr(module, "_epochs", deleting)


def test_a_damaged_shard_a_dataloader_worker_finds_is_raised_with_its_own_problem(tiny_store, tmp_path, monkeypatch):
    """A shard object gone from a done shard, found by a DataLoader worker as it streams: torch rebuilds the
    DamagedShardError from its own text alone (the worker's traceback in it), which ``problem`` took. train raised it with
    the worker's message but kept that text as its ``problem`` (how the shard reads wrong, as verify lists it). (Gone
    once the run is under way: a store lacking it at the start is refused before the run begins.)"""
    from kdcache.errors import DamagedShardError

    damaged = copy_store(tiny_store, tmp_path)
    gone_once_under_way(monkeypatch, Path(damaged) / "targets" / "logits" / "c" / "2" / "0")
    p = pipeline(*PLAIN, "train.memory_budget_mb=0", "train.num_workers=2", "train.epochs=1")
    with pytest.raises(DamagedShardError, match=r"^'.*' is damaged: shard 2 of targets/logits \(rows 32-47\) is missing") as e:
        train(p, damaged, tmp_path / "run")
    assert e.value.problem == str(e.value) and "Caught" not in e.value.problem and "\n" not in e.value.problem


@pytest.mark.parametrize("workers", [0, 2])
def test_inputs_that_require_grad_train_as_their_values(tiny_store, tmp_path, workers, steps):
    """Inputs computed outside torch.no_grad() (views of one tensor with a graph behind it) are the store's inputs, and the
    student learns from their values: the second step's backward ran into the dataset's graph, freed by the first
    ("Trying to backward through the graph a second time"), and a DataLoader worker could not batch them at all
    (torch.stack(out=) refuses autograd); both were RuntimeError tracebacks."""
    p = pipeline(*PLAIN, 'data.factory="numbered.py:tiny_embedded"', f"train.num_workers={workers}", "train.epochs=1")
    train(p, tiny_store, tmp_path / "run")
    assert len(steps) == 7  # 50 rows in batches of 8
    plain = [s["loss"] for s in steps]
    steps.clear()
    train(pipeline(*PLAIN, "train.epochs=1"), tiny_store, tmp_path / "plain")
    assert [s["loss"] for s in steps] == plain


def test_quarter_fingerprint_check_catches_a_shuffled_dataset(tiny_store, tmp_path):
    p = pipeline(*PLAIN, 'data.factory="numbered.py:tiny_shuffled"', "train.fingerprint_check=0.25")
    with pytest.raises(AlignmentError, match=r"store row \d+ \(dataset index \d+\)"):
        train(p, tiny_store, tmp_path / "run")


def test_dataset_of_another_length_is_a_store_error(tiny_store, tmp_path):
    p = pipeline(*PLAIN, 'data.factory="numbered.py:tiny_short"')
    with pytest.raises(StoreError, match=r"has 40 samples but the store has 50"):
        train(p, tiny_store, tmp_path / "run")


# ------------------------------------------------------------------------------------------ refusals


def test_a_store_whose_logits_are_a_layer_named_logits_says_to_distill_it_as_a_feature(tmp_path):
    """extract's fix for a teacher module named 'logits' (it would clash with the output) is targets.logits = false; train
    then said the store has no logits and to "extract with targets.logits = true", which clashes again. It names the
    layer and the setting that distills it (train.features.logits), which trains."""
    (tmp_path / "named.py").write_text("import torch\nimport tiny\n\nclass Named(torch.nn.Module):\n    def __init__(self):\n"
                                       "        super().__init__()\n        self.body = tiny.teacher()\n        self.logits = torch.nn.Identity()\n\n"
                                       "    def forward(self, x):\n        return self.logits(self.body(x))\n\ndef teacher():\n    return Named()\n")
    named = (f"teacher.factory='{tmp_path / 'named.py'}:teacher'", "targets.logits=false", "targets.layers=['logits']")
    assert any("distill the layer with train.features.logits" in w for w in kdcache.dry_run(pipeline(*named))["warnings"])
    store = extract_tiny(tmp_path / "named.zarr", *named)
    with pytest.raises(PipelineError, match=r"its target 'logits' is the teacher module of that name, stored as a layer "
                                            r"\(targets/layers/logits\); set train.loss.kl and mse to 0 and distill it with "
                                            r'train.features.logits = \{student = "MODULE"\}'):
        train(pipeline(*named, *PLAIN), store, str(tmp_path / "run"))
    fixed = ("train.loss.kl=0", "train.features={logits={student='fc'}}", "train.epochs=1", "train.eval_split=''")
    train(pipeline(*named, *fixed), store, str(tmp_path / "run"))


def test_incomplete_store_needs_allow_partial(tiny_store, tmp_path, steps):
    location = copy_store(tiny_store, tmp_path)
    zarr.open_group(location, mode="r+")[layout.DONE][1] = False  # rows 16..31 unwritten
    with pytest.raises(StoreError, match=r"incomplete \(34/50 samples\).*pass allow_partial=True to train"):
        train(pipeline(*PLAIN), location, tmp_path / "refused")
    result = train(pipeline(*PLAIN), location, tmp_path / "run", allow_partial=True)
    assert result["epoch"] == 1
    used = np.concatenate([s["rows"] for s in steps])
    assert len(used) == 2 * 34
    assert set(used.tolist()) == set(range(50)) - set(range(16, 32))



def test_allow_partial_says_how_much_of_the_store_it_trains_on(tiny_store, tmp_path):
    """``train --allow-partial`` on a store with shards 1 and 2 of 4 not done trained on 18 of its 50 samples without a
    word: it says so in a note (in ``--json``'s notes), and so does a resume, on the shards done as the run began."""
    location = copy_store(tiny_store, tmp_path)
    zarr.open_group(location, mode="r+")[layout.DONE][1:3] = False  # rows 16..47 unwritten
    args = ["train", str(TINY_TOML), "--cache", location, "--out", str(tmp_path / "run"), "--allow-partial",
            *(x for s in PLAIN for x in ("--set", s))]
    note = f"note: training on 18 of 50 samples (2 of 4 shards done) of {location!r}"
    result = CliRunner().invoke(cli.main, [*args, "--epochs", "1"])
    assert result.exit_code == 0 and note in result.output.splitlines(), result.output
    zarr.open_group(location, mode="r+")[layout.DONE][1] = True  # one more done: the run keeps its own
    result = CliRunner().invoke(cli.main, [*args, "--epochs", "2", "--resume", "--json"])
    assert result.exit_code == 0, result.output
    notes = json.loads(result.output)["notes"]
    assert f"note: training on 18 of 50 samples (2 of 4 shards, those done as the run began) of {location!r}" in notes, notes


def without_member(zipped: Path, member: str) -> None:
    """Rewrite the zip ``zipped`` without its ``member`` (a zip copied in part, or edited)."""
    import zipfile

    kept = zipped.with_suffix(".kept")
    with zipfile.ZipFile(zipped) as z, zipfile.ZipFile(kept, "w") as w:
        for info in z.infolist():
            if info.filename != member:
                w.writestr(info, z.read(info))
    kept.replace(zipped)


def lacking(location: str, objects: list[str], fix: str, shards: str, first: str, of: int = 4, what: str = "") -> str:
    """The one line train refuses a store with whose done shards lack objects."""
    return (f"Error: {what}{location!r} lacks objects of {objects} of the {of} marked done that this run reads (an incomplete copy, "
            f"or objects deleted): shards {shards}, object {first!r} missing; {fix}; kdcache verify {location} lists every damaged "
            "object (nothing was written)")


@pytest.mark.parametrize("kind, lost, budget", [
    ("folder", ["targets/logits/c/2/0"], 2048),  # in memory: found once the student was built
    ("folder", ["targets/logits/c/2/0"], 0),  # streaming: found where the shard was read, OUT written
    ("folder", ["samples/fingerprint/c/3", "targets/layers/features.3/c/1/0/0/0"], 0),
    ("zip", ["progress/digest/c/1/0"], 2048),  # its digest row: its rows cannot be checked
    ("zip", ["samples/index/c/0"], 0),
])
def test_a_store_whose_done_shards_lack_objects_is_refused_before_the_run_begins(tiny_store, tmp_path, kind, lost, budget):
    """A store whose done shards lack objects (an incomplete copy: rsync or aws s3 sync cut short, a copy of a store being
    extracted; objects deleted) was trained on until a read reached such a shard: streaming, hours into the run, with
    pipeline.json written; in memory, once the student was built. Now train lists the objects of the shards it reads
    first and refuses at once, in one line naming the store, the shards, one object and the fix; nothing is written."""
    damaged = copy_store(tiny_store, tmp_path)
    if kind == "zip":
        from kdcache.interop import pack

        zipped = tmp_path / "copy.zarr.zip"
        pack(damaged, zipped)
        for member in lost:
            without_member(zipped, member)
        damaged, fix = str(zipped), "copy the zip again, or pack the store again from a complete folder (kdcache pack FOLDER OUT)"
    else:
        for key in lost:
            (Path(damaged) / key).unlink()
        fix = f"copy the store again, or run kdcache extract PIPELINE --out {damaged}, which resumes it and rewrites those shards"
    shards = sorted(int(key.split("/c/")[1].split("/")[0]) for key in lost)
    first = min(lost, key=lambda key: (int(key.split("/c/")[1].split("/")[0]), key))
    r = CliRunner().invoke(cli.main, ["train", str(TINY_TOML), "--cache", damaged, "--out", str(tmp_path / "run"), "--set",
                                      f"train.memory_budget_mb={budget}"])
    assert r.exit_code == 1 and r.output.splitlines() == [lacking(damaged, f"{len(lost)} shard{'s' * (len(lost) > 1)}", fix,
                                                                  str(shards), first)], r.output
    assert not (tmp_path / "run").exists()


def test_an_object_of_a_target_the_run_does_not_read_is_left_alone(tiny_store, tmp_path):
    """Only the arrays the run reads are looked for: a run distilling the logits alone trains from a store whose
    features.3 lost an object (kdcache verify names it), as before."""
    damaged = copy_store(tiny_store, tmp_path)
    (Path(damaged) / "targets/layers/features.3/c/1/0/0/0").unlink()
    result = train(pipeline(*PLAIN, "train.epochs=1"), damaged, tmp_path / "run")
    assert result["epoch"] == 0 and (tmp_path / "run" / "student.pt").is_file()  # its one epoch


def test_a_subset_is_refused_only_for_the_shards_holding_its_rows(tiny_store, tmp_path):
    """A train.subset reads only the shards holding its rows: a lost object of another shard leaves it to train as before,
    one of a shard holding its rows is refused before the run begins."""
    rows = np.sort(np.random.default_rng(0).permutation(50)[:3])  # train.subset = 3's rows (train._rows), seed 0
    read, unread = sorted({int(r) // 16 for r in rows}), sorted(set(range(4)) - {int(r) // 16 for r in rows})
    assert unread, rows
    damaged = copy_store(tiny_store, tmp_path)
    (Path(damaged) / f"targets/logits/c/{unread[0]}/0").unlink()
    result = train(pipeline(*PLAIN, "train.epochs=1", "train.subset=3", "train.seed=0"), damaged, tmp_path / "run")
    assert result["epoch"] == 0 and (tmp_path / "run" / "student.pt").is_file()
    (Path(damaged) / f"targets/logits/c/{read[0]}/0").unlink()
    with pytest.raises(StoreError, match=rf"lacks objects of 1 shard of the {len(read)} marked done that this run reads .*: shards "
                                         rf"\[{read[0]}\], object 'targets/logits/c/{read[0]}/0' missing"):
        train(pipeline(*PLAIN, "train.epochs=1", "train.subset=3", "train.seed=0"), damaged, tmp_path / "again")
    assert not (tmp_path / "again").exists()


@pytest.mark.parametrize("budget", [2048, 0])
def test_an_eval_cache_whose_done_shard_lacks_an_object_is_refused_before_the_run_begins(tiny_store, test_store, tmp_path, budget):
    """train.eval_cache's objects were first read by the first evaluation, at the end of the first epoch, checkpoint and
    metrics written; now they are listed with the training store's, and the run is refused at once, naming the setting
    and the extract (of its split) that rewrites the shard."""
    evaluated = copy_store(test_store, tmp_path)
    (Path(evaluated) / "targets/logits/c/3/0").unlink()
    p = ["--set", "train.features={}", "--set", f'train.eval_cache="{evaluated}"', "--set", f"train.memory_budget_mb={budget}"]
    r = CliRunner().invoke(cli.main, ["train", str(TINY_TOML), "--cache", tiny_store, "--out", str(tmp_path / "run"), *p])
    fix = f"copy the store again, or run kdcache extract PIPELINE --out {evaluated} --set data.split=test, which resumes it and rewrites those shards"
    assert r.exit_code == 1 and r.output.splitlines() == [lacking(evaluated, "1 shard", fix, "[3]", "targets/logits/c/3/0",
                                                                  what="train.eval_cache ")], r.output
    assert not (tmp_path / "run").exists()


def test_resume_on_a_store_that_gained_shards_keeps_the_run_s_rows(tiny_store, tmp_path, steps, monkeypatch):
    """--allow-partial on a store being extracted, then --resume after more shards completed: the resumed run
    trains on the rows it started with (recorded in its checkpoint), and its subset is the same choice, so it
    reaches the weights of a run that was never interrupted."""
    import importlib

    module = importlib.import_module("kdcache.train")
    location = copy_store(tiny_store, tmp_path)
    zarr.open_group(location, mode="r+")[layout.DONE][1] = False  # rows 16..31 not done yet
    values = (*PLAIN, "train.subset=20", "train.epochs=3")
    train(pipeline(*values), location, tmp_path / "whole", allow_partial=True)
    whole = torch.load(tmp_path / "whole" / "student.pt", weights_only=True)
    rows_whole = [s["rows"] for s in steps]
    steps.clear()

    class Stopped(Exception):
        pass

    save = module._save_epoch

    def save_then_stop(*args, **kwargs):  # the run is stopped right after its first checkpoint
        save(*args, **kwargs)
        raise Stopped

    monkeypatch.setattr(module, "_save_epoch", save_then_stop)
    with pytest.raises(Stopped):
        train(pipeline(*values), location, tmp_path / "run", allow_partial=True)
    monkeypatch.setattr(module, "_save_epoch", save)
    zarr.open_group(location, mode="r+")[layout.DONE][1] = True  # the extract finished meanwhile
    train(pipeline(*values), location, tmp_path / "run", resume=True, allow_partial=True)
    assert all(np.array_equal(a, b) for a, b in zip(rows_whole, [s["rows"] for s in steps], strict=True))
    resumed = torch.load(tmp_path / "run" / "student.pt", weights_only=True)
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert not set(np.concatenate(rows_whole).tolist()) & set(range(16, 32))
    # a checkpoint of an earlier kdcache records fewer facts of its store: those it has are compared
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    for key in ("rows_per_shard", "targets", "precision"):
        del ckpt["store"][key]
    torch.save(ckpt, tmp_path / "run" / "checkpoint.pt")
    train(pipeline(*values[:-1], "train.epochs=4"), location, tmp_path / "run", resume=True)
    # a new run takes every row done now
    steps.clear()
    train(pipeline(*PLAIN, "train.epochs=1"), location, tmp_path / "new")
    assert set(np.concatenate([s["rows"] for s in steps]).tolist()) == set(range(50))


def test_a_checkpoint_one_epoch_behind_its_metrics_ends_a_resumed_run_on_its_own_epoch(tiny_store, tmp_path):
    """_save_epoch appends the epoch's metrics line, then replaces the checkpoint: a crash in between leaves metrics.jsonl
    a line ahead of checkpoint.pt. Resumed where the plan now ends at the checkpoint (train.epochs lowered), the run ends
    on the checkpoint's epoch, its line the last: never on the line of an epoch whose weights were not saved. Resumed
    with the epoch to go, it is trained again and its line replaces the earlier one."""
    out = tmp_path / "run"
    train(pipeline(*PLAIN, "train.epochs=2"), tiny_store, out)
    behind = (out / "checkpoint.pt").read_bytes()  # saved at the end of epoch 1
    train(pipeline(*PLAIN, "train.epochs=3"), tiny_store, out, resume=True)
    (out / "checkpoint.pt").write_bytes(behind)  # epoch 2's line written, its checkpoint not: the crash in between
    result = train(pipeline(*PLAIN, "train.epochs=2"), tiny_store, out, resume=True)
    assert result["epoch"] == 1 and [m["epoch"] for m in metrics(out)] == [0, 1]
    train(pipeline(*PLAIN, "train.epochs=3"), tiny_store, out, resume=True)
    assert [m["epoch"] for m in metrics(out)] == [0, 1, 2]


def test_eval_cache_without_labels_reports_agreement_only(tiny_store, tmp_path):
    """An eval store of an unlabeled dataset has no accuracies to report: none is written (not a 0)."""
    unlabeled = extract_tiny(tmp_path / "unlabeled-test.zarr", 'data.split="test"', 'data.factory="numbered.py:tiny_unlabelled"')
    train(pipeline(*PLAIN, "train.epochs=1", 'data.factory="numbered.py:tiny_unlabelled"', f'train.eval_cache="{unlabeled}"',
                   "train.loss.ce=0"), tiny_store, tmp_path / "run")
    (line,) = metrics(tmp_path / "run")
    assert "eval_agreement" in line and "eval_accuracy" not in line and "eval_teacher_accuracy" not in line


def test_the_shortcut_flags_take_any_text_as_it_is(tiny_store, test_store, tmp_path):
    """--eval-cache (and --device, --layers) reach the pipeline as TOML text: a path holding a character beyond the BMP
    (an emoji) or DEL is that path, not the JSON text it was written as ('"\\ud83d..."': no store there)."""
    evaluated = tmp_path / "t\u00e9st \U0001f600\x7f.zarr"
    shutil.copytree(test_store, evaluated)
    out = tmp_path / "run"
    result = CliRunner().invoke(cli.main, ["train", str(TINY_TOML), "--cache", tiny_store, "--out", str(out), "--epochs", "1",
                                           "--eval-cache", str(evaluated)])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "pipeline.json").read_text())["train"]["eval_cache"] == str(evaluated)
    assert "eval_agreement" in metrics(out)[-1]


def test_a_failed_overwrite_leaves_the_earlier_run(tiny_store, tmp_path, monkeypatch):
    """--overwrite replaces the earlier run's files only once the new run has saved its first epoch: one that
    fails before (here, a dataset that changed since extraction) leaves them as they were."""
    out = tmp_path / "run"
    train(pipeline(*PLAIN, "train.epochs=1"), tiny_store, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(AlignmentError, match=r"store row 17 "):
        train(pipeline(*PLAIN, 'data.factory="numbered.py:tiny_modified"'), tiny_store, out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # the first checkpoint is written whole before the earlier run's files go: a full disk there keeps them
    module = importlib.import_module("kdcache.train")
    save = module._save

    def full_disk_for_the_next_checkpoint(obj, path):
        if path.name == module.NEXT_CHECKPOINT:
            raise OSError(errno.ENOSPC, "No space left on device")
        save(obj, path)

    with monkeypatch.context() as m:
        m.setattr(module, "_save", full_disk_for_the_next_checkpoint)
        with pytest.raises(OSError):
            train(pipeline(*PLAIN, "train.lr=0.02"), tiny_store, out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    train(pipeline(*PLAIN, "train.epochs=2", "train.lr=0.02"), tiny_store, out, overwrite=True)
    assert [m["epoch"] for m in metrics(out)] == [0, 1] and json.loads((out / "pipeline.json").read_text())["train"]["lr"] == 0.02
    assert sorted(p.name for p in out.iterdir()) == sorted(["checkpoint.pt", "heads.pt", "metrics.jsonl", "pipeline.json", "student.pt"])


@pytest.mark.parametrize("killed_at", ["pipeline.json", "metrics.jsonl", "rename"])
def test_an_overwrite_killed_while_it_replaces_the_earlier_run_resumes_from_its_first_checkpoint(tiny_store, tmp_path, monkeypatch,
                                                                                                 killed_at):
    """An --overwrite run killed after its first checkpoint (checkpoint.pt.next) was saved whole and the earlier run's
    files were removed, before the checkpoint was renamed into place: --resume (and --auto-resume) continue from it to
    the weights of an uninterrupted run, with its own pipeline.json and metrics (was 'no checkpoint.pt'); a new run
    needs --overwrite and leaves no .next behind (a fresh run wrote checkpoint.pt beside it, for a later --resume)."""
    module = importlib.import_module("kdcache.train")
    new = (*PLAIN, "train.epochs=2", "train.lr=0.02")
    train(pipeline(*new), tiny_store, tmp_path / "whole")
    whole = torch.load(tmp_path / "whole" / "student.pt", weights_only=True)

    class Killed(Exception):
        pass

    write, replace = module._atomic_write_text, os.replace

    def killed_writing(path, text):
        if path.name == killed_at:
            raise Killed
        write(path, text)

    def killed_renaming(src, dst):
        if Path(src).name == module.NEXT_CHECKPOINT:
            raise Killed
        replace(src, dst)

    for how in ("resume", "auto"):
        out = tmp_path / how
        train(pipeline(*PLAIN, "train.epochs=1"), tiny_store, out)  # the earlier run
        with monkeypatch.context() as m:
            m.setattr(module, "_atomic_write_text", killed_writing)
            m.setattr(module.os, "replace", killed_renaming if killed_at == "rename" else replace)
            with pytest.raises(Killed):
                train(pipeline(*new), tiny_store, out, overwrite=True)
        assert not (out / CHECKPOINT).exists() and (out / module.NEXT_CHECKPOINT).is_file()
        shutil.copytree(out, tmp_path / f"{how}-fresh")
        with pytest.raises(StoreError, match=r"already holds a training run; pass resume=True"):
            train(pipeline(*new), tiny_store, out)
        train(pipeline(*new), tiny_store, out, resume=True if how == "resume" else "auto")
        resumed = torch.load(out / "student.pt", weights_only=True)
        assert all(torch.equal(whole[k], resumed[k]) for k in whole)
        assert [m["epoch"] for m in metrics(out)] == [0, 1] and json.loads((out / "pipeline.json").read_text())["train"]["lr"] == 0.02
        assert sorted(p.name for p in out.iterdir()) == sorted(["checkpoint.pt", "heads.pt", "metrics.jsonl", "pipeline.json", "student.pt"])
    # a new run in their place replaces the stopped one's checkpoint.pt.next with its own, and renames it
    fresh = tmp_path / "resume-fresh"
    train(pipeline(*PLAIN, "train.epochs=1"), tiny_store, fresh, overwrite=True)
    assert [m["epoch"] for m in metrics(fresh)] == [0] and json.loads((fresh / "pipeline.json").read_text())["train"]["epochs"] == 1
    assert sorted(p.name for p in fresh.iterdir()) == sorted(["checkpoint.pt", "heads.pt", "metrics.jsonl", "pipeline.json", "student.pt"])


def test_a_resume_whose_next_checkpoint_another_run_put_in_place_while_it_started_says_run_it_again(tiny_store, tmp_path, monkeypatch):
    """Two --resume of an --overwrite run stopped before it renamed its checkpoint.pt.next into place, at once: each reads
    the .next before it takes OUT's lock, and the one that takes it second finds the other has finished the replacement
    (checkpoint.pt there, the .next gone). It stops with one line and changes nothing; run again, it resumes."""
    module = importlib.import_module("kdcache.train")
    out = tmp_path / "run"
    train(pipeline(*PLAIN, "train.epochs=1"), tiny_store, out)
    os.replace(out / CHECKPOINT, out / module.NEXT_CHECKPOINT)  # stopped before the rename: its files are the new run's
    lock = module.locking.writer_lock

    @contextlib.contextmanager
    def taken_second(*args, **kwargs):
        os.replace(out / module.NEXT_CHECKPOINT, out / CHECKPOINT)  # the other --resume, which took the lock first
        with lock(*args, **kwargs):
            yield

    with monkeypatch.context() as m:
        m.setattr(module.locking, "writer_lock", taken_second)
        with pytest.raises(StoreError, match=rf"^{re.escape(repr(str(out)))} changed while this run started \(another run wrote it\); "
                                             r"run the same command again$"):
            train(pipeline(*PLAIN, "train.epochs=2"), tiny_store, out, resume=True)
    assert [m["epoch"] for m in metrics(out)] == [0] and (out / CHECKPOINT).is_file()
    train(pipeline(*PLAIN, "train.epochs=2"), tiny_store, out, resume=True)
    assert [m["epoch"] for m in metrics(out)] == [0, 1]


def test_a_resume_of_the_earlier_run_removes_the_first_checkpoint_of_an_overwrite_stopped_before_it_replaced_it(
        tiny_store, tmp_path, monkeypatch, capsys):
    """An --overwrite run stopped after saving checkpoint.pt.next, before it removed the earlier run's files: a
    --resume continues the earlier run (its checkpoint.pt) and removes the .next, which nothing would read again
    (it stayed for ever, a checkpoint's size; a later loss of checkpoint.pt made --resume take it up)."""
    module = importlib.import_module("kdcache.train")
    out = tmp_path / "run"
    for folder in (out, tmp_path / "whole"):
        train(pipeline(*PLAIN, "train.epochs=1"), tiny_store, folder)
    train(pipeline(*PLAIN, "train.epochs=2"), tiny_store, tmp_path / "whole", resume=True)  # the same, never stopped

    class Killed(Exception):
        pass

    def killed(*args):
        raise Killed

    with monkeypatch.context() as m:
        m.setattr(module, "_replace_run", killed)
        with pytest.raises(Killed):
            train(pipeline(*PLAIN, "train.lr=0.02"), tiny_store, out, overwrite=True)
    assert (out / CHECKPOINT).is_file() and (out / module.NEXT_CHECKPOINT).is_file()
    capsys.readouterr()
    train(pipeline(*PLAIN, "train.epochs=2"), tiny_store, out, resume=True)
    assert "note: removed" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == sorted(["checkpoint.pt", "heads.pt", "metrics.jsonl", "pipeline.json", "student.pt"])
    whole, resumed = (torch.load(d / "student.pt", weights_only=True) for d in (tmp_path / "whole", out))
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_store_with_no_done_shard_is_refused_even_when_partial_allowed(tiny_store, tmp_path):
    location = copy_store(tiny_store, tmp_path)
    zarr.open_group(location, mode="r+")[layout.DONE][:] = False
    with pytest.raises(StoreError, match="no completed shard"):
        train(pipeline(*PLAIN), location, tmp_path / "run", allow_partial=True)


def test_unknown_format_version_is_refused(tiny_store, tmp_path):
    location = copy_store(tiny_store, tmp_path)
    group = zarr.open_group(location, mode="r+")
    group.attrs[layout.ATTRS] = {**group.attrs[layout.ATTRS], "format_version": 99}
    with pytest.raises(StoreError, match=r"format version 99.*reads version 1"):
        train(pipeline(*PLAIN), location, tmp_path / "run")


def test_zarr_group_without_kdcache_is_refused(tmp_path):
    zarr.open_group(tmp_path / "foreign.zarr", mode="w", zarr_format=3).create_array("x", shape=(4,), dtype="int8")
    with pytest.raises(StoreError, match="not a kdcache store"):
        train(pipeline(*PLAIN), str(tmp_path / "foreign.zarr"), tmp_path / "run")
    with pytest.raises(StoreError, match="no store at"):
        train(pipeline(*PLAIN), str(tmp_path / "missing.zarr"), tmp_path / "run")


# ---------------------------------------------------------------------------------------------- losses


@pytest.mark.parametrize(
    ("weights", "terms"),
    [
        (["train.loss.kl=1", "train.loss.ce=0"], ["kl"]),
        (["train.loss.kl=0", "train.loss.mse=1", "train.loss.ce=0"], ["mse"]),
        (["train.loss.kl=0", "train.loss.ce=1"], ["ce"]),
        (["train.loss.kl=1", "train.loss.mse=0.5", "train.loss.ce=0.5"], ["ce", "kl", "mse"]),
    ],
    ids=["kl", "mse", "ce", "all"],
)
def test_loss_terms_follow_the_weights(tiny_store, tmp_path, steps, weights, terms):
    train(pipeline(*PLAIN, *weights), tiny_store, tmp_path / "run")
    assert all(s["parts"] == terms for s in steps)
    last = metrics(tmp_path / "run")[-1]
    assert sorted(k for k in last if k.startswith("loss_")) == [f"loss_{t}" for t in terms]
    assert last["loss"] == pytest.approx(sum(last[f"loss_{t}"] for t in terms))
    assert all(np.isfinite(s["loss"]) for s in steps)


def test_mse_on_probabilities_trains_the_softened_distributions(tiny_store, tmp_path, monkeypatch):
    """train.loss.mse_on = "probabilities": the mse term is probability_mse at train.loss.temperature, a Brier score
    (at most 2), and the student learns the teacher's distribution from it."""
    temperatures: list[float] = []
    real = losses.probability_mse
    monkeypatch.setattr(losses, "probability_mse", lambda s, t, T, mask=None: temperatures.append(T) or real(s, t, T, mask))
    p = pipeline(*PLAIN, "train.loss.kl=0", "train.loss.mse=1", "train.loss.mse_on=probabilities", "train.loss.temperature=3",
                 "train.epochs=3", "train.lr=0.01")
    train(p, tiny_store, tmp_path / "run")
    runs = metrics(tmp_path / "run")
    assert temperatures and set(temperatures) == {3.0} and len(temperatures) == 3 * 7  # every step, none with the logits' MSE
    assert all(0 < m["loss_mse"] <= 2 for m in runs) and runs[-1]["loss_mse"] < runs[0]["loss_mse"]
    assert json.loads((tmp_path / "run" / "pipeline.json").read_text())["train"]["loss"]["mse_on"] == "probabilities"


def test_feature_loss_with_projection_head(tiny_store, tmp_path, capsys):
    out = tmp_path / "run"
    train(pipeline("train.eval_split=''"), tiny_store, out)  # student conv (4, 8, 8) vs teacher (16, 8, 8)
    assert "projection head for 'features.3' <- student 'conv': 1x1 conv 4->16" in capsys.readouterr().out
    heads = torch.load(out / "heads.pt", weights_only=True)
    key = "targets/layers/features%2E3.conv.weight"  # keyed by the target's array path, dots encoded
    assert sorted(heads) == [key.replace("weight", "bias"), key] and heads[key].shape == (16, 4, 1, 1)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert torch.equal(ckpt["heads"][key], heads[key])
    assert "loss_feat:features.3" in metrics(out)[-1]


def test_a_float64_student_gets_a_float64_projection_head(tiny_store, tmp_path):
    """A float64 student's feature went through a float32 head: a RuntimeError traceback ("Input type (double) and bias
    type (float)") at the first step. The head takes the dtype of the student module's output; the losses stay float32."""
    out = tmp_path / "run"
    train(pipeline("train.eval_split=''", "student.factory='tiny.py:double_student'", "train.epochs=1"), tiny_store, out)
    heads = torch.load(out / "heads.pt", weights_only=True)
    assert heads and all(h.dtype == torch.float64 for h in heads.values())
    assert math.isfinite(metrics(out)[-1]["loss_feat:features.3"])


def test_train_json_prints_one_json_object_when_it_makes_a_projection_head(tiny_store, tmp_path):
    """--json is for a script: the notes train prints (a projection head made, a run resumed) are its "notes", not lines
    before the object on stdout (stderr stays the one Error: line of a failure)."""
    args = ["train", str(TINY_TOML), "--cache", tiny_store, "--no-progress", "--json", "--set", "train.eval_split=''"]
    first = CliRunner().invoke(cli.main, [*args, "--out", str(tmp_path / "run"), "--epochs", "1"])
    assert first.exit_code == 0, first.output
    result = json.loads(first.stdout)
    assert result["epoch"] == 0 and result["notes"] == ["projection head for 'features.3' <- student 'conv': 1x1 conv 4->16"]
    resumed = CliRunner().invoke(cli.main, [*args, "--out", str(tmp_path / "run"), "--epochs", "2", "--resume"])
    assert resumed.exit_code == 0, resumed.output
    result = json.loads(resumed.stdout)
    assert result["epoch"] == 1 and any(n.startswith("resuming ") for n in result["notes"]), result["notes"]


def test_feature_loss_without_head_when_shapes_agree(tiny_store, tmp_path, capsys, steps):
    out = tmp_path / "run"
    train(pipeline("train.eval_split=''", 'student.factory="numbered.py:wide_student"'), tiny_store, out)
    assert "projection head" not in capsys.readouterr().out
    assert torch.load(out / "heads.pt", weights_only=True) == {}
    assert steps[0]["parts"] == ["ce", "feat:features.3", "kl"]


def test_unbridgeable_feature_shapes_fail_before_training(tiny_store, tmp_path, steps):
    out = tmp_path / "run"
    p = pipeline('train.features={"features.3" = {student = "fc"}}')  # student vector (4,) vs teacher map
    with pytest.raises(ShapeMismatchError, match=r"target 'features.3'.*\(4,\).*\(16, 8, 8\)"):
        train(p, tiny_store, out)
    assert steps == []
    assert not any((out / name).exists() for name in ("checkpoint.pt", "metrics.jsonl", "student.pt"))


def test_ce_needs_a_store_with_labels(tmp_path):
    location = extract_tiny(tmp_path / "unlabelled.zarr", 'data.factory="numbered.py:tiny_unlabelled"', "targets.layers=[]")
    p = pipeline(*PLAIN, 'data.factory="numbered.py:tiny_unlabelled"')
    with pytest.raises(PipelineError, match=r"train.loss.ce needs labels.*set train.loss.ce = 0"):
        train(p, location, tmp_path / "run")
    result = train(pipeline(*PLAIN, 'data.factory="numbered.py:tiny_unlabelled"', "train.loss.ce=0"), location, tmp_path / "run")
    assert result["loss_kl"] > 0 and "eval_accuracy" not in result


def test_feature_layer_missing_from_store_is_a_pipeline_error(store32, tmp_path):
    with pytest.raises(PipelineError, match=r"'features.3', which .* does not store \(its layers: \[\]\)"):
        train(pipeline(), store32, tmp_path / "run")  # tiny.toml asks for features.3; store32 has logits only
    with pytest.raises(PipelineError, match="nothing to learn"):
        train(pipeline(*PLAIN, "train.loss.kl=0", "train.loss.ce=0"), store32, tmp_path / "run")


def test_a_typo_of_a_stored_feature_layer_is_told_the_stored_layer_first(tiny_store, tmp_path):
    """train.features naming 'featurs.3' of a store holding 'features.3' was told "name one of them, or extract a store
    with 'featurs.3' in targets.layers": a store of the typo, for a layer the teacher may not have. The stored layer
    close to it is named first; nothing is written."""
    p = pipeline("train.features={ 'featurs.3' = { student = 'conv', weight = 0.1 } }")
    with pytest.raises(PipelineError, match=r"^train.features names teacher layer 'featurs.3', which .* does not store \(its layers: "
                       r"\['features.3'\]\); did you mean 'features.3'\? Name it in train.features, or extract a store with "
                       r"'featurs.3' in targets.layers \(--layers\)$"):
        train(p, tiny_store, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_feature_weights_all_zero_with_every_loss_weight_zero_is_nothing_to_learn(tiny_store, tmp_path):
    """A train.features entry of weight 0 is no loss either: the run would train on a loss of 0 (weight decay alone)."""
    p = pipeline("train.eval_split=''", "train.loss.kl=0", "train.loss.ce=0", 'train.features."features.3".weight=0')
    with pytest.raises(PipelineError, match=r"every loss weight is 0 and every train.features entry has weight 0; nothing to learn"):
        train(p, tiny_store, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_feature_entry_of_weight_0_is_off_but_still_checked(tiny_store, store32, tmp_path, monkeypatch, capsys):
    """Weight 0 turns a train.features term off: its layer was read from the store every epoch, its student module
    hooked (its output cloned at every forward) and a projection head built (in heads.pt, trained by weight decay
    alone), for a loss_feat of 0. Now none of that, and no loss_feat; the entry is still checked (its layer stored,
    its student module there)."""
    zero = 'train.features."features.3".weight=0'
    losses_of, seen = Run.losses, []

    def observed(self, batch):
        seen.append((sorted(batch["targets"]), [n for n, m in self.student.named_modules() if m._forward_hooks]))
        return losses_of(self, batch)

    monkeypatch.setattr(Run, "losses", observed)
    out = tmp_path / "run"
    result = train(pipeline(zero, "train.eval_split=''", "train.epochs=1"), tiny_store, out)
    assert "projection head" not in capsys.readouterr().out
    assert seen and set(map(str, seen)) == {str((["targets/logits"], []))}
    assert torch.load(out / "heads.pt", weights_only=True) == {}
    assert not any(k.startswith("loss_feat") for k in [*result, *metrics(out)[0]])
    with pytest.raises(PipelineError, match=r"'features.3', which .* does not store \(its layers: \[\]\)"):
        train(pipeline(zero), store32, tmp_path / "other")
    with pytest.raises(kdcache.errors.TargetError, match=r"layer 'nope' is not a module of the student"):
        train(pipeline('train.features."features.3"={student="nope", weight=0}'), tiny_store, tmp_path / "other")


def test_a_run_begun_with_a_head_for_a_feature_of_weight_0_resumes_with_it(tiny_store, tmp_path, capsys):
    """kdcache <= 0.1.12 built a projection head for an entry of weight 0: such a run's checkpoint holds it (and its
    optimizer state), so its --resume keeps the term, with a note, rather than refusing its checkpoint."""
    out = tmp_path / "run"
    train_cut_after_first_epoch(pipeline("train.eval_split=''", "train.epochs=2"), tiny_store, out)
    for file in (out / CHECKPOINT, out / "pipeline.json"):  # as such a run records it: an entry of weight 0
        recorded = torch.load(file, weights_only=True) if file.suffix == ".pt" else {"pipeline": json.loads(file.read_text())}
        recorded["pipeline"]["train"]["features"]["features.3"]["weight"] = 0.0
        torch.save(recorded, file) if file.suffix == ".pt" else file.write_text(json.dumps(recorded["pipeline"]))
    capsys.readouterr()
    train(pipeline("train.eval_split=''", "train.epochs=2", 'train.features."features.3".weight=0'), tiny_store, out, resume=True)
    assert "keeps the term of train.features 'features.3' (weight 0)" in capsys.readouterr().err
    assert [m["loss_feat:features.3"] for m in metrics(out)][1] == 0 and torch.load(out / "heads.pt", weights_only=True)


# --------------------------------------------------------------------------------------------- outputs


def test_outputs(tiny_store, test_store, tmp_path):
    out = tmp_path / "run"
    p = pipeline(f'train.eval_cache="{test_store}"')
    result = train(p, tiny_store, out)

    student = tiny.student()
    student.load_state_dict(torch.load(out / "student.pt", weights_only=True))
    assert json.loads((out / "pipeline.json").read_text()) == json.loads(json.dumps(p.to_dict()))
    lines = metrics(out)
    assert [m["epoch"] for m in lines] == [0, 1] and [m["step"] for m in lines] == [7, 14]
    for m in lines:
        assert {"loss", "loss_kl", "loss_ce", "loss_feat:features.3", "eval_accuracy", "eval_agreement", "eval_teacher_accuracy"} <= set(m)
    assert result["params"] == sum(t.numel() for t in student.parameters())

    # The eval numbers, recomputed from the saved student and the eval store.
    test = layout.open_store(test_store)
    teacher_pred = torch.from_numpy(test.array(layout.LOGITS)[:].astype(np.float32)).argmax(-1)
    labels = torch.from_numpy(test.array(layout.LABEL)[:])
    with torch.no_grad():
        pred = student.eval()(tiny.dataset("test").x).argmax(-1)
    assert lines[-1]["eval_accuracy"] == pytest.approx(float((pred == labels).float().mean()))
    assert lines[-1]["eval_agreement"] == pytest.approx(float((pred == teacher_pred).float().mean()))
    assert lines[-1]["eval_teacher_accuracy"] == pytest.approx(float((teacher_pred == labels).float().mean()))

    with pytest.raises(StoreError, match=r"already holds a training run; pass resume=True to continue it or overwrite=True to start afresh$"):
        train(p, tiny_store, out)
    train(pipeline(*PLAIN, "train.epochs=1"), tiny_store, out, overwrite=True)
    assert len(metrics(out)) == 1 and "eval_accuracy" not in metrics(out)[0]


def test_a_new_run_keeps_files_in_out_that_are_not_this_runs(tiny_store, tmp_path):
    """A new run into a folder holding no run's checkpoint replaced a pipeline.json, metrics.jsonl and heads.pt found there
    (a user's pipeline file with --out ., another tool's metrics) with no --overwrite given. It is refused in one line
    naming them, unless pipeline.json is this run's own values (the same command, stopped before its first checkpoint,
    run again: it trains); --overwrite replaces them."""
    p = pipeline(*PLAIN, "train.epochs=1")
    out = tmp_path / "project"
    out.mkdir()
    mine = {"pipeline.json": '{"mine": 1}\n', "metrics.jsonl": '{"step": 1}\n', "notes.md": "keep"}
    for name, text in mine.items():
        (out / name).write_text(text)
    with pytest.raises(StoreError, match=re.escape(f"{str(out)!r} holds 'pipeline.json', 'metrics.jsonl' but no training run's "
                                                   "checkpoint.pt, and not this run's pipeline.json: a new run would replace them; "
                                                   "move them away or choose another out (overwrite=True replaces them)")):
        train(p, tiny_store, out)
    assert {name: (out / name).read_text() for name in mine} == mine and sorted(os.listdir(out)) == sorted(mine)
    (out / "metrics.jsonl").unlink()
    (out / "pipeline.json").write_text(json.dumps(p.to_dict()))  # this run's own, from a start stopped before its checkpoint
    train(p, tiny_store, out)
    assert (out / "notes.md").read_text() == "keep" and len(metrics(out)) == 1
    again = tmp_path / "again"
    again.mkdir()
    (again / "heads.pt").write_text("a user's")
    train(p, tiny_store, again, overwrite=True)
    assert (again / "student.pt").is_file()


def test_overwrite_replaces_only_a_kdcache_run_s_student_and_checkpoint(tiny_store, tmp_path):
    """A folder holding another tool's checkpoint.pt (no kdcache keys) or a user's student.pt, and no kdcache
    pipeline.json, was refused as "already holds a training run" (pass --overwrite), and --overwrite deleted them. Both
    are refused in one line naming what is there, with or without --overwrite, the files unchanged; a kdcache run whose
    pipeline.json is lost (its checkpoint has kdcache's keys) is still replaced."""
    p = pipeline(*PLAIN, "train.epochs=1")
    out = tmp_path / "project"
    out.mkdir()
    torch.save({"model": {"w": torch.ones(2)}, "opt": {}}, out / "checkpoint.pt")
    torch.save({"w": torch.ones(2)}, out / "student.pt")
    mine = {name: (out / name).read_bytes() for name in os.listdir(out)}
    refused = re.escape(f"{str(out)!r} holds 'checkpoint.pt', 'student.pt' but no kdcache training run ('checkpoint.pt' is not a "
                        "kdcache checkpoint: a dict without ['student', 'heads', 'optimizer', 'schedule', 'rng', 'epoch', 'step', "
                        "'shards']; no pipeline.json): a new run would replace them, and overwrite=True replaces only a kdcache run's "
                        "files; move them away or choose another out")
    for overwrite in (False, True):
        with pytest.raises(StoreError, match=f"^{refused}$"):
            train(p, tiny_store, out, overwrite=overwrite)
        assert {name: (out / name).read_bytes() for name in os.listdir(out)} == mine
    with pytest.raises(StoreError, match=r"is not a kdcache checkpoint \(a dict without .*project' holds no kdcache run's pipeline.json "
                                         r"either \(overwrite=True replaces only a kdcache run's files\): move the file away"):
        train(p, tiny_store, out, resume=True)
    (out / "checkpoint.pt").unlink()
    (out / "pipeline.json").write_text('{"model": "mine"}')
    with pytest.raises(StoreError, match=r"holds 'student.pt' but no kdcache training run \(a pipeline.json that is not kdcache's\): "
                                         r"a new run would replace it, and overwrite=True replaces only"):
        train(p, tiny_store, out, overwrite=True)
    assert (out / "student.pt").read_bytes() == mine["student.pt"]

    run = tmp_path / "run"
    train(p, tiny_store, run)
    (run / "pipeline.json").unlink()  # a kdcache run that lost it: its checkpoint is kdcache's
    train(pipeline(*PLAIN, "train.epochs=1", "train.lr=0.02"), tiny_store, run, overwrite=True)
    assert json.loads((run / "pipeline.json").read_text())["train"]["lr"] == 0.02


def test_a_kdcache_checkpoint_mmap_cannot_map_is_still_told_as_one(tmp_path):
    """OUT's checkpoint is told a kdcache one by its keys, its tensors mapped (mmap) rather than read; one in torch.save's
    legacy format, which mmap refuses, is read whole instead: a kdcache run that lost its pipeline.json is still one."""
    from kdcache.train import _CHECKPOINT_KEYS, _checkpoint_kind

    torch.save({key: torch.zeros(3) for key in _CHECKPOINT_KEYS}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    torch.save({key: torch.zeros(3) for key in _CHECKPOINT_KEYS}, tmp_path / "zip.pt")
    assert _checkpoint_kind(tmp_path / "legacy.pt") == _checkpoint_kind(tmp_path / "zip.pt") == ""
    (tmp_path / "empty.pt").write_bytes(b"")
    assert _checkpoint_kind(tmp_path / "empty.pt").startswith("it cannot be read (")


def test_eval_metrics_count_a_tie_at_the_teacher_s_top_by_its_share(tmp_path):
    """float16 teacher logits tie at the top where float32 ones differ in the 4th digit: eval_agreement and
    eval_teacher_accuracy took argmax's lowest tied class, so they depended on how the classes are numbered. A tie of k
    classes counts 1/k where the student's top class (the label) is one of them (losses.top1_matches), in kdcache stats too."""
    from kdcache.stats import stats

    tied = ["teacher.factory=tiny.py:ties_in_float16", "targets.layers=[]"]
    store, evaluated = extract_tiny(tmp_path / "train.zarr", *tied), extract_tiny(tmp_path / "test.zarr", *tied, 'data.split="test"')
    last = train(pipeline(*tied, "train.features={}", f'train.eval_cache="{evaluated}"', "train.epochs=1"), store, tmp_path / "run")
    teacher = layout.open_store(evaluated).array(layout.LOGITS)[:].astype(np.float32)
    tops = [set(np.flatnonzero(row == row.max())) for row in teacher]
    assert sum(len(t) == 2 for t in tops) > 5  # the stored ties this test is about
    student = tiny.student()
    student.load_state_dict(torch.load(tmp_path / "run" / "student.pt", weights_only=True))
    with torch.no_grad():
        pred = student.eval()(tiny.dataset("test").x).argmax(-1).tolist()  # float32: no tie
    labels = tiny.dataset("test").y.tolist()
    assert last["eval_agreement"] == pytest.approx(np.mean([(p in t) / len(t) for p, t in zip(pred, tops)]))
    assert last["eval_teacher_accuracy"] == pytest.approx(np.mean([(y in t) / len(t) for y, t in zip(labels, tops)]))
    assert stats(evaluated)["teacher_accuracy"] == pytest.approx(last["eval_teacher_accuracy"])


def test_rows_without_a_label_train_on_the_others_and_are_left_out_of_the_accuracies(tmp_path):
    """A label below 0 is no label (STL-10's unlabeled split: -1; Hugging Face: -100): train.loss.ce trains on the labeled
    rows (it refused the store: "holds label -1 but the student's output has 4 classes"), and eval_accuracy,
    eval_teacher_accuracy and kdcache stats count labeled rows only (they counted -1 as a wrong answer); an eval split
    without any label reports no accuracy, never a 0 that reads as one."""
    from kdcache.stats import stats

    labelled = ["data.factory=tiny.py:partly_labelled"]
    store = extract_tiny(tmp_path / "part.zarr", *labelled)
    unlabelled = extract_tiny(tmp_path / "none.zarr", *labelled, 'data.split="test"')
    out, seen = tmp_path / "run", []
    ce_of = losses.cross_entropy

    def ce(logits, labels):
        seen.append(labels.clone())
        return ce_of(logits, labels)

    p = pipeline(*labelled, "train.eval_split=train", f'train.eval_cache="{store}"', "train.epochs=1")
    with pytest.MonkeyPatch.context() as m:
        m.setattr(losses, "cross_entropy", ce)
        last = train(p, store, out)
    assert torch.cat(seen).lt(0).sum() == 25  # every unlabeled row was trained on (kl, features), with no ce
    student = tiny.student()
    student.load_state_dict(torch.load(out / "student.pt", weights_only=True))
    images = tiny.partly_labelled("train")
    known = images.y >= 0
    teacher_pred = torch.from_numpy(layout.open_store(store).array(layout.LOGITS)[:].astype(np.float32)).argmax(-1)
    with torch.no_grad():
        pred = student.eval()(images.x).argmax(-1)
    assert last["eval_accuracy"] == pytest.approx(float((pred == images.y)[known].float().mean()))
    assert last["eval_teacher_accuracy"] == pytest.approx(float((teacher_pred == images.y)[known].float().mean()))
    assert last["eval_agreement"] == pytest.approx(float((pred == teacher_pred).float().mean()))  # every row
    summary = stats(store)
    assert summary["teacher_accuracy"] == pytest.approx(last["eval_teacher_accuracy"])
    assert sum(c["count"] for c in summary["per_class"].values()) == 25

    last = train(pipeline(*labelled, "train.eval_split=test", f'train.eval_cache="{unlabelled}"', "train.epochs=1"), store, tmp_path / "b")
    assert "eval_agreement" in last and "eval_accuracy" not in last and "eval_teacher_accuracy" not in last
    assert stats(unlabelled)["teacher_accuracy"] is None and stats(unlabelled)["per_class"] is None


def test_eval_cache_of_another_split_is_a_pipeline_error(tiny_store, tmp_path):
    with pytest.raises(PipelineError, match=r"train.eval_split = 'test' but train.eval_cache holds split 'train'"):
        train(pipeline(f'train.eval_cache="{tiny_store}"'), tiny_store, tmp_path / "run")


def test_an_incomplete_eval_cache_names_its_own_fix(test_store, tiny_store, tmp_path):
    """An eval store being extracted was refused with the training store's words, 'pass allow_partial=True to train on
    completed shards only', which changes nothing for it: the eval store must be whole, even with allow_partial."""
    evaluated = copy_store(test_store, tmp_path)
    (Path(evaluated) / "progress/done/c/1").unlink()
    with pytest.raises(StoreError, match=r"^train.eval_cache '.*copy.zarr' is incomplete \(34/50 samples\): its metrics would leave out "
                                         r"the rest; resume its kdcache extract \(allow_partial=True applies to the training store alone\), "
                                         r"or drop train.eval_cache$"):
        train(pipeline(*PLAIN, f'train.eval_cache="{evaluated}"'), tiny_store, tmp_path / "run", allow_partial=True)


def test_a_missing_eval_cache_names_the_setting_and_the_split_to_extract(tiny_store, tmp_path):
    """It was 'no store at X; run kdcache extract PIPELINE --out X first', the training store's words: that extract
    wrote the training split, which an eval store is then refused for. Nothing is written to the run's folder."""
    missing = tmp_path / "test.zarr"
    with pytest.raises(StoreError, match=rf"^train.eval_cache: no store at '{re.escape(str(missing))}'; extract the eval split there "
                                         rf"first \(kdcache extract PIPELINE --out {re.escape(str(missing))} --set data.split=test\), "
                                         r"or drop train.eval_cache$"):
        train(pipeline("train.features={}", f'train.eval_cache="{missing}"'), tiny_store, tmp_path / "run")
    assert not missing.exists() and not any((tmp_path / "run").glob("*.pt"))


def test_an_eval_split_of_the_training_samples_under_another_name_is_refused(tiny_store, tmp_path):
    """A data.factory that ignores its split (train=True whatever it is asked) gave the training samples as split 'test':
    eval_accuracy and eval_agreement were measured on training data, under the eval split's name, without a word. Its
    items are fingerprinted as the store's first and last ones are; a store of the eval split is refused as well."""
    one = "data.factory='tiny.py:one_split'"
    with pytest.raises(PipelineError, match=r"^train.eval_split = 'test' gives the samples the student trains on: its 50 items begin and end "
                                            r"as split 'train' of the store trained from does \(data.factory gives one split whatever the split "
                                            r"asked\?\); make data.factory return the split it is asked for, or set train.eval_split = 'train' "
                                            r"to measure training data on purpose$"):
        train(pipeline(one, "train.features={}"), tiny_store, tmp_path / "run")
    evaluated = extract_tiny(tmp_path / "test.zarr", one, 'data.split="test"')
    with pytest.raises(PipelineError, match=r"^train.eval_cache '.*test.zarr' \(split 'test'\) holds the samples the student trains on: its 50 "
                                            r"samples begin and end as split 'train' of the store trained from does \(data.factory gives one split "
                                            r"whatever the split asked\?\); make data.factory return the split it is asked for and extract the "
                                            r"eval split again, or drop train.eval_cache$"):
        train(pipeline(one, *PLAIN, f'train.eval_cache="{evaluated}"'), tiny_store, tmp_path / "run")
    train(pipeline(one, "train.features={}", "train.eval_split=train", "train.epochs=1"), tiny_store, tmp_path / "run")  # on purpose


def test_evaluating_on_the_split_trained_on_is_one_warning_line(tiny_store, test_store, tmp_path, capsys):
    """A store of the test split trained with train.eval_split = "test" (tiny.toml's) evaluated the student on the rows it
    trained on without a word. Allowed (eval_split names the split on purpose), it is now one warning line on stderr,
    as is an eval store of the training samples with eval_split naming their split, and the extract's dry run says so;
    a held-out split says nothing."""
    def warnings(*overrides: str, cache: str = test_store) -> list[str]:
        train(pipeline("train.features={}", "train.epochs=1", *overrides), cache, tmp_path / "run", overwrite=True)
        return [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]

    assert warnings() == ["warning: train.eval_split = 'test' evaluates the student on split 'test', the split it trains on: its "
                          "eval metrics measure training data, not held-out data; extract another split to evaluate on "
                          "(train.eval_split, train.eval_cache)"]
    assert warnings(f'train.eval_cache="{test_store}"') == [
        f"warning: train.eval_cache {test_store!r} evaluates the student on split 'test', the split it trains on: its eval metrics "
        "measure training data, not held-out data; extract another split to evaluate on (train.eval_split, train.eval_cache)"]
    assert warnings(cache=tiny_store) == [] and warnings(f'train.eval_cache="{test_store}"', cache=tiny_store) == []
    assert kdcache.dry_run(pipeline('data.split="test"'))["warnings"] == [
        "train.eval_split = 'test' is the split this store holds: kdcache train from it would evaluate the student on the split "
        "it trains on (its eval metrics would measure training data); train from another split's store, and use this one as "
        "train.eval_cache"]
    assert kdcache.dry_run(pipeline())["warnings"] == []


def test_eval_split_without_eval_cache_reports_accuracy_only(tiny_store, tmp_path):
    train(pipeline("train.features={}", "train.epochs=1"), tiny_store, tmp_path / "run")
    (line,) = metrics(tmp_path / "run")
    assert "eval_accuracy" in line and "eval_agreement" not in line


def test_resume_needs_a_checkpoint(tiny_store, tmp_path):
    """Said as the caller says it: kdcache.train's arguments from Python (it named the CLI's --resume, which a Python
    caller cannot pass), the command's flags from kdcache train, and Python's again after a command ran in-process."""
    with pytest.raises(StoreError, match=r"^resume=True: no checkpoint.pt in .*; run without resume=True to start training$"):
        train(pipeline(*PLAIN), tiny_store, tmp_path / "run", resume=True)
    result = CliRunner().invoke(cli.main, ["train", str(TINY_TOML), "--cache", tiny_store, "--out", str(tmp_path / "run"), "--resume"])
    assert result.exit_code == 1 and result.output.strip() == (f"Error: --resume: no checkpoint.pt in {str(tmp_path / 'run')!r}; run "
                                                               "without --resume to start training"), result.output
    with pytest.raises(StoreError, match=rf"^out {re.escape(repr(tiny_store))} is a zarr store, not a training run's folder; choose another out$"):
        train(pipeline(*PLAIN), tiny_store, tiny_store)


@pytest.mark.slow
def test_resume_after_the_last_epoch_only_writes_the_weights(tiny_store, tmp_path):
    """Killed after the last checkpoint but before student.pt: --resume trains no further and saves
    the checkpoint's weights (and starts no epoch's batches)."""
    out = tmp_path / "run"
    train(pipeline(*PLAIN, "train.epochs=2"), tiny_store, out)
    want = torch.load(out / "student.pt", weights_only=True)
    lines = metrics(out)
    (out / "student.pt").unlink()
    (out / "heads.pt").unlink()
    train(pipeline(*PLAIN, "train.epochs=2"), tiny_store, out, resume=True)
    got = torch.load(out / "student.pt", weights_only=True)
    assert all(torch.equal(got[k], want[k]) for k in want) and (out / "heads.pt").exists()
    assert metrics(out) == lines
    (out / "metrics.jsonl").unlink()  # deleted by hand: the weights are still written, and the epoch and step returned
    result = train(pipeline(*PLAIN, "train.epochs=2"), tiny_store, out, resume=True)
    assert (result["epoch"], result["step"]) == (1, 14) and (out / "student.pt").exists()


def test_killed_run_resumes_to_the_uninterrupted_result(tiny_store, tmp_path):
    """A run killed (SIGKILL) once it has saved a checkpoint resumes to the uninterrupted run's weights and losses. Its
    items past 7 epochs' worth (the 7th epoch, with the probes' items) wait until it is killed: a loaded box may train
    the 7 epochs left after its first checkpoint (3 s) before the kill lands."""
    epochs = 8
    reference = tmp_path / "reference"
    train(pipeline(f"train.epochs={epochs}"), tiny_store, reference)  # with a feature loss and its projection head

    out, hold = tmp_path / "run", tmp_path / "hold"
    args = [str(TINY_TOML), "--cache", tiny_store, "--out", str(out), "--epochs", str(epochs), "--no-progress",
            "--set", 'data.factory="numbered.py:tiny_slow"']
    hold.touch()
    env = {**os.environ, "OMP_NUM_THREADS": "1",  # as this process (conftest): same kernels, same numbers
           "KDCACHE_TEST_HOLD": str(hold), "KDCACHE_TEST_HOLD_AFTER": str(50 * (epochs - 1))}  # 50 train items an epoch
    proc = subprocess.Popen([sys.executable, "-m", "kdcache.cli", "train", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240  # a loaded box took more than 120 s to start the run and train its first epoch
        while not (out / "checkpoint.pt").exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
        hold.unlink()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "student.pt").exists() and len(metrics(out)) < epochs

    result = CliRunner().invoke(cli.main, ["train", *args, "--resume"])
    assert result.exit_code == 0, result.output
    for name in ("student.pt", "heads.pt"):
        got, want = torch.load(out / name, weights_only=True), torch.load(reference / name, weights_only=True)
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want), name
    lines = metrics(out)
    assert [m["epoch"] for m in lines] == list(range(epochs))
    assert [m["loss"] for m in lines] == [m["loss"] for m in metrics(reference)]


def test_the_epochs_flag_trains_that_many_epochs_where_the_pipeline_sets_steps(tiny_store, tmp_path):
    toml = tmp_path / "steps.toml"  # as pipelines/mnist.toml: [train] steps = N
    toml.write_text(TINY_TOML.read_text().replace('"tiny.py:', f'"{FIXTURES}/tiny.py:').replace("[train]\n", "[train]\nsteps = 30\n"))
    result = CliRunner().invoke(cli.main, ["train", str(toml), "--cache", tiny_store, "--out", str(tmp_path / "run"), "--epochs", "1"])
    assert result.exit_code == 0, result.output
    assert [m["epoch"] for m in metrics(tmp_path / "run")] == [0]
    assert json.loads((tmp_path / "run" / "pipeline.json").read_text())["train"]["steps"] == 0
    # a --set of the [train] table that leaves steps out sets no steps (its reset to the default is not a --set of them)
    table = 'train={batch_size=8, lr=0.01, device="cpu"}'
    result = CliRunner().invoke(cli.main, ["train", str(toml), "--cache", tiny_store, "--out", str(tmp_path / "table"), "--epochs", "1",
                                           "--set", table])
    assert result.exit_code == 0, result.output
    assert [m["epoch"] for m in metrics(tmp_path / "table")] == [0]


@pytest.mark.parametrize("workers", [0, 1], ids=["no-workers", "a-dataloader-worker"])
def test_resume_with_dropout_reaches_the_uninterrupted_weights(tiny_store, tmp_path, capsys, workers):
    """Dropout draws from torch's RNG each step: a resumed run restores its state, and nothing else may draw from it
    (a DataLoader's workers took their seed from it when first started: once in a whole run, again in a resumed one)."""
    p = pipeline("student.factory='bad_input.py:dropping'", "train.features={}", "train.epochs=3", f"train.num_workers={workers}")
    train(p, tiny_store, tmp_path / "whole")
    train_cut_after_first_epoch(p, tiny_store, tmp_path / "cut")
    torch.manual_seed(12345)  # whatever this process drew since: the resumed run must not depend on it
    capsys.readouterr()
    train(p, tiny_store, tmp_path / "cut", resume=True)
    assert f"resuming {str(tmp_path / 'cut')!r} after epoch 0 (step 7 of 21)" in capsys.readouterr().out
    got, want = (torch.load(tmp_path / run / "student.pt", weights_only=True) for run in ("cut", "whole"))
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert [m["loss"] for m in metrics(tmp_path / "cut")] == [m["loss"] for m in metrics(tmp_path / "whole")]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_trains_the_student_in_autocast_and_keeps_float32_weights(tiny_store, tmp_path, precision):
    """train.precision: the student's forward and heads run in autocast (other numbers than fp32's, close to them);
    its weights, the heads and the optimizer stay float32; fp16 keeps a loss scale in the checkpoint, bf16 needs none."""
    runs = {}
    for p in ("fp32", precision):
        train(pipeline("train.epochs=2", f"train.precision='{p}'"), tiny_store, tmp_path / p)  # feature loss, head, eval
        runs[p] = {name: torch.load(tmp_path / p / name, weights_only=True) for name in ("student.pt", "heads.pt", CHECKPOINT)}
    for name in ("student.pt", "heads.pt"):
        want, got = runs["fp32"][name], runs[precision][name]
        assert all(got[k].dtype == torch.float32 for k in got), name
        assert not all(torch.equal(got[k], want[k]) for k in want), f"{name}: autocast changed nothing"
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=0.05, msg=k)
    assert ("scaler" in runs[precision][CHECKPOINT]) == (precision == "fp16")
    assert "scaler" not in runs["fp32"][CHECKPOINT]
    assert metrics(tmp_path / precision)[-1]["eval_accuracy"] == pytest.approx(metrics(tmp_path / "fp32")[-1]["eval_accuracy"], abs=0.1)


def test_training_a_float16_student_is_one_line(tiny_store, tmp_path):
    """train.precision = "fp16" with a student of float16 parameters (a .half() model): GradScaler's "Attempting to
    unscale FP16 gradients." was a traceback at the first step. One line naming the setting and the fix."""
    result = CliRunner().invoke(cli.main, ["train", str(TINY_TOML), "--cache", tiny_store, "--out", str(tmp_path / "run"),
                                           "--set", "student.factory='tiny.py:half_student'", "--set", "train.precision='fp16'"])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert result.output.startswith("Error: --set train.precision='fp16': train.precision = \"fp16\" keeps float32 weights"), result.output
    assert "builds a student with float16 parameters (e.g. 'conv.weight'); return the model in float32" in result.output
    # AdamW (the default) in float16 makes NaN weights at the first step: that was "training diverged ... lower train.lr"
    for precision in ("bf16", "fp32"):
        result = CliRunner().invoke(cli.main, ["train", str(TINY_TOML), "--cache", tiny_store, "--out", str(tmp_path / precision), "--set",
                                               "student.factory='tiny.py:half_student'", "--set", f"train.precision='{precision}'"])
        assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
        assert "float16 parameters (e.g. 'conv.weight'), whose AdamW state underflows" in result.output, result.output


def test_an_fp16_run_resumes_with_its_loss_scale(tiny_store, tmp_path):
    """A large loss weight overflows fp16 gradients at the initial scale (65536): the first steps are skipped and the
    scale halved. A resumed run restores the scale its checkpoint reached; starting from 65536 again would skip
    steps the uninterrupted run took (AdamW makes the weight itself harmless)."""
    p = pipeline("train.precision='fp16'", "train.loss={ce=100.0}", *PLAIN, "train.epochs=3")
    train(p, tiny_store, tmp_path / "whole")
    train_cut_after_first_epoch(p, tiny_store, tmp_path / "cut")
    assert torch.load(tmp_path / "cut" / CHECKPOINT, weights_only=True)["scaler"]["scale"] < 2.0**16  # steps were skipped
    train(p, tiny_store, tmp_path / "cut", resume=True)
    got, want = (torch.load(tmp_path / run / "student.pt", weights_only=True) for run in ("cut", "whole"))
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert [m["loss"] for m in metrics(tmp_path / "cut")] == [m["loss"] for m in metrics(tmp_path / "whole")]


def test_a_regression_teacher_is_distilled_with_the_squared_error(tmp_path):
    """A teacher of one value per sample stores logits of shape (N,): train.loss.mse distils them (the student learns
    to match), and KL, which needs a class axis, is one line saying so."""
    store = extract_tiny(tmp_path / "regression.zarr", "teacher.factory='bad_input.py:regression_teacher'", "targets.layers=[]")
    assert kdcache.open_store(store).targets["logits"].shape == ()
    p = pipeline("student.factory='bad_input.py:regression_student'", "train.loss={mse=1.0, kl=0.0}", *PLAIN, "train.epochs=8")
    train(p, store, tmp_path / "run")
    losses = [m["loss_mse"] for m in metrics(tmp_path / "run")]
    assert losses[-1] < 0.5 * losses[0], losses
    result = CliRunner().invoke(cli.main, ["train", str(TINY_TOML), "--cache", store, "--out", str(tmp_path / "kl"),
                                           "--set", "student.factory='bad_input.py:regression_student'", "--set", "train.features={}",
                                           "--set", "train.eval_split=''", "--set", "train.loss.ce=0"])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert "kl_divergence: logits must have shape (B, C)" in result.output and "a regression output" in result.output, result.output
    # agreement with the teacher's top class needs classes too, labels or not: refused before training (it was a
    # TypeError traceback after the first epoch)
    unlabelled = ("teacher.factory='bad_input.py:regression_teacher'", "data.factory='numbered.py:tiny_unlabelled'", "targets.layers=[]")
    extract_tiny(tmp_path / "train.zarr", *unlabelled)
    evaluated = extract_tiny(tmp_path / "test.zarr", *unlabelled, "data.split='test'")
    with pytest.raises(PipelineError, match=r"train.eval_cache = .*eval_accuracy and eval_agreement compare one class per sample .*"
                                            r"has shape \[1\] for one sample, not \(batch, classes\)"):
        train(pipeline(*unlabelled, "student.factory='bad_input.py:regression_student'", "train.loss={mse=1.0, kl=0.0}", *PLAIN,
                       f"train.eval_cache='{evaluated}'"), str(tmp_path / "train.zarr"), tmp_path / "evaluated")


@pytest.mark.parametrize("loss", ["kl=1.0", 'mse=1.0, mse_on="probabilities", kl=0.0'], ids=["kl", "probabilities"])
def test_kl_or_probabilities_over_logits_of_one_class_are_refused_before_training(tmp_path, loss):
    """A regression head's Linear(d, 1) stores (N, 1) logits: softmax over one class is 1 whatever the logit, so kl (on by
    default) and mse on probabilities were 0 at every step and a run trained on nothing (loss_kl 0.0 every epoch, no error);
    refused in one line naming the fix, which trains, and said by extract's dry run before any extract."""
    one = ("teacher.factory='bad_input.py:one_logit_teacher'", "student.factory='bad_input.py:one_logit_student'", "targets.layers=[]")
    store = extract_tiny(tmp_path / "one.zarr", *one)
    assert kdcache.open_store(store).targets["logits"].shape == (1,)
    refused = rf"train.loss.{loss[:2]}.* the stored logits have one class \(per-sample shape \[1\]\): softmax over one class is 1 .*" \
              r'train.loss.mse > 0 with mse_on = "logits", and train.loss.kl = 0'
    with pytest.raises(PipelineError, match=refused):
        train(pipeline(*one, *PLAIN, f"train.loss={{{loss}}}"), store, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    assert re.search(refused, " ".join(kdcache.dry_run(pipeline(*one, f"train.loss={{{loss}}}"))["warnings"]))
    train(pipeline(*one, *PLAIN, "train.loss={mse=1.0, kl=0.0}", "train.epochs=4"), store, tmp_path / "mse")
    assert metrics(tmp_path / "mse")[-1]["loss_mse"] < 0.5 * metrics(tmp_path / "mse")[0]["loss_mse"]


def test_a_resume_that_changes_the_length_says_the_schedule_is_planned_again(tiny_store, tmp_path, capsys, monkeypatch):
    train_cut_after_first_epoch(pipeline("train.epochs=4"), tiny_store, tmp_path / "run")
    capsys.readouterr()
    lrs, step = [], torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: (lrs.append(self.param_groups[0]["lr"]), step(self, *a, **k))[1])
    train(pipeline("train.epochs=2"), tiny_store, tmp_path / "run", resume=True)
    out = capsys.readouterr().out
    assert "resume=True: train.epochs was 4, now 2: the learning-rate schedule is planned again over the new length" in out, out
    assert [m["epoch"] for m in metrics(tmp_path / "run")] == [0, 1]
    # steps 7..13 of 14 follow the new plan from the first one (not the 28-step plan's lr at step 7)
    assert lrs == pytest.approx([0.01 * 0.5 * (1 + np.cos(np.pi * s / 14)) for s in range(7, 14)], rel=1e-12)


def test_a_resume_refused_for_a_length_shorter_than_trained_does_not_say_the_schedule_is_planned_again(tiny_store, tmp_path, capsys):
    """``--resume --epochs 1`` of a run trained 2 epochs printed "the learning-rate schedule is planned again over the new
    length from here on" and then the error refusing that length: the note is said only for a length that is accepted."""
    train(pipeline(*PLAIN, "train.epochs=2"), tiny_store, tmp_path / "run")
    capsys.readouterr()
    with pytest.raises(PipelineError, match="more than train.epochs = 1"):
        train(pipeline(*PLAIN, "train.epochs=1"), tiny_store, tmp_path / "run", resume=True)
    assert "planned again" not in capsys.readouterr().out


def test_a_second_resume_compares_the_length_with_the_plan_its_checkpoint_was_trained_under(tiny_store, tmp_path, capsys):
    """The length was compared with pipeline.json, which keeps the run's first values: after a --resume to 2 epochs, one
    to 3 said "was 1, now 3" and one to 2 again said the schedule was planned again when nothing changed (and a --resume
    back to the first length, whose plan had ended, said nothing while the learning rate rose again)."""
    def resumed(epochs: int) -> str:
        capsys.readouterr()
        train(pipeline(*PLAIN, f"train.epochs={epochs}"), tiny_store, tmp_path / "run", resume=epochs > 0)
        return capsys.readouterr().out

    train(pipeline(*PLAIN, "train.epochs=1"), tiny_store, tmp_path / "run")
    assert "resume=True: train.epochs was 1, now 2: the learning-rate schedule is planned again" in resumed(2)
    assert "planned again" not in resumed(2)
    assert "resume=True: train.epochs was 2, now 3: the learning-rate schedule is planned again" in resumed(3)
    assert json.loads((tmp_path / "run" / "pipeline.json").read_text())["train"]["epochs"] == 1  # the run's first values


@pytest.mark.parametrize("damage", ["deleted", "truncated"])
def test_a_resume_whose_pipeline_json_is_lost_compares_with_the_values_its_checkpoint_records(tiny_store, tmp_path, damage):
    """pipeline.json deleted or damaged: a --resume with another train.lr or seed was let through, and (deleted) wrote its
    own values as the run's record. The checkpoint records the run's values too: the resume is refused naming it, the
    same values resume, and pipeline.json is written again with the run's values."""
    out = tmp_path / "run"
    train_cut_after_first_epoch(pipeline(*PLAIN, "train.epochs=2"), tiny_store, out)
    recorded = (out / "pipeline.json").read_text()
    if damage == "deleted":
        (out / "pipeline.json").unlink()
    else:
        (out / "pipeline.json").write_text(recorded[: len(recorded) // 2])
    with pytest.raises(PipelineError, match=re.escape(f"resume=True: train.lr was 0.01 in this run ({str(out / CHECKPOINT)!r}), now 0.5")):
        train(pipeline(*PLAIN, "train.epochs=2", "train.lr=0.5"), tiny_store, out, resume=True)
    train(pipeline(*PLAIN, "train.epochs=2"), tiny_store, out, resume=True)
    assert [m["epoch"] for m in metrics(out)] == [0, 1]
    if damage == "deleted":
        assert json.loads((out / "pipeline.json").read_text()) == json.loads(recorded)


def test_a_run_recorded_before_a_setting_existed_resumes_with_its_default(tiny_store, tmp_path):
    """pipeline.json of a run an earlier kdcache began lacks settings added since (train.drop_last): the run had their
    defaults, so it resumes with them, and a resume that sets another value is still refused."""
    out = tmp_path / "run"
    train_cut_after_first_epoch(pipeline("train.epochs=2"), tiny_store, out)
    recorded = json.loads((out / "pipeline.json").read_text())
    del recorded["train"]["drop_last"]
    (out / "pipeline.json").write_text(json.dumps(recorded))
    with pytest.raises(PipelineError, match=r"^resume=True: train.drop_last was False in this run .* now True"):
        train(pipeline("train.epochs=2", "train.drop_last=true"), tiny_store, out, resume=True)
    train(pipeline("train.epochs=2"), tiny_store, out, resume=True)
    assert [m["epoch"] for m in metrics(out)] == [0, 1]


def test_a_feature_entry_that_spells_out_its_defaults_resumes_the_run_that_left_them_out(tiny_store, tmp_path):
    """weight = 1.0 and select = "auto" in a train.features entry are what leaving them out means: a resume that
    writes them (or drops them) continues the same run; another value is still refused."""
    out, bare = tmp_path / "run", "train.features={ 'features.3' = { student = 'conv' } }"
    train_cut_after_first_epoch(pipeline("train.epochs=2", bare), tiny_store, out)
    with pytest.raises(PipelineError, match=r"^resume=True: train.features.features.3.weight was 1.0 in this run .* now 0.5"):
        train(pipeline("train.epochs=2", "train.features={ 'features.3' = { student = 'conv', weight = 0.5 } }"), tiny_store, out,
              resume=True)
    train(pipeline("train.epochs=2", "train.features={ 'features.3' = { student = 'conv', weight = 1.0, select = 'auto' } }"),
          tiny_store, out, resume=True)
    assert [m["epoch"] for m in metrics(out)] == [0, 1]


def test_two_teacher_layers_may_be_distilled_into_one_student_module(tmp_path):
    """One student module, two feature losses: its output is captured once per forward (not taken for a shared module)."""
    store = extract_tiny(tmp_path / "two.zarr", "targets.layers=['features.1', 'features.3']")
    result = train(pipeline("train.epochs=1", "train.features={ 'features.1' = { student = 'conv' }, 'features.3' = { student = 'conv' } }"),
                   store, tmp_path / "run")
    assert np.isfinite(result["loss_feat:features.1"]) and np.isfinite(result["loss_feat:features.3"])


def test_a_student_the_factory_keeps_is_left_without_hooks(tiny_store, tmp_path):
    """A factory may return a model it keeps (a notebook's): the feature hooks train puts on it are removed when it returns
    or raises, not left by every call (each would clone the module's output at every forward of the model, for ever)."""
    kept = ["student.factory='tiny.py:kept_student'", "train.eval_split=''", "train.epochs=1"]
    student = tiny.kept_student()
    for _ in range(2):
        train(pipeline(*kept), tiny_store, tmp_path / "run", overwrite=True)
    with pytest.raises(PipelineError, match="train.subset = 1000 exceeds"):  # raised after the hooks are made
        train(pipeline(*kept, "train.subset=1000"), tiny_store, tmp_path / "other")
    assert [name for name, m in student.named_modules() if m._forward_hooks] == []


def test_a_student_the_factory_keeps_is_left_in_the_modes_train_found_it_in(tiny_store, tmp_path, monkeypatch):
    """train evaluates at the end (eval mode): a student the factory keeps (a notebook's, fine-tuned after) was left with
    dropout off and BatchNorm frozen. Each module's mode is put back as train found it, when it returns and when it raises."""
    kept = ["student.factory='tiny.py:kept_student'", "train.features={}", "train.epochs=1"]
    student = tiny.kept_student()
    student.train()
    train(pipeline(*kept), tiny_store, tmp_path / "run", overwrite=True)
    assert [name for name, m in student.named_modules() if not m.training] == []
    student.eval(), student.conv.train()  # in eval mode but one module: a step that raises, after training began
    losses_of, calls = Run.losses, iter(range(10**9))

    def raising(self, batch):
        if next(calls) == 3:
            raise RuntimeError("a step that fails")
        return losses_of(self, batch)

    monkeypatch.setattr(Run, "losses", raising)
    with pytest.raises(RuntimeError, match="a step that fails"):
        train(pipeline(*kept), tiny_store, tmp_path / "run", overwrite=True)
    assert [name for name, m in student.named_modules() if m.training] == ["conv"]
    student.train()


@pytest.mark.parametrize("workers", [0, 2])
def test_a_run_that_raises_stops_making_batches_at_once(tiny_store, tmp_path, monkeypatch, workers):
    """The error's traceback (a notebook keeps it) holds the epoch's iterator: the TransferSet's thread making batches
    ahead, or the DataLoader's worker processes, stop when train raises, not when the traceback is dropped."""
    import multiprocessing
    import threading

    losses_of, calls = Run.losses, []

    def failing(self, batch):
        calls.append(batch)
        if len(calls) == 3:
            raise TrainingError("stopped at step 3")
        return losses_of(self, batch)

    def making() -> set:
        return {*multiprocessing.active_children(), *(t for t in threading.enumerate() if t.name == "kdcache-prefetch")}

    before = making()
    monkeypatch.setattr(Run, "losses", failing)
    with pytest.raises(TrainingError, match="stopped at step 3") as raised:
        train(pipeline(*PLAIN, f"train.num_workers={workers}"), tiny_store, tmp_path / "run")
    deadline = time.monotonic() + 60  # 10 s: tight for processes ending on a loaded box
    while making() - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert raised.value.__traceback__ is not None and making() - before == set()


def test_an_evaluation_that_raises_stops_the_eval_stores_batches(tmp_path, monkeypatch):
    """A Ctrl-C in an evaluation leaves no thread making the eval store's batches (3 of them: two are made ahead)."""
    import threading

    from conftest import NUMBERED
    from kdcache import data
    from kdcache.pipeline import from_dict

    def spec(split: str, **more: dict) -> kdcache.Pipeline:
        return from_dict({**NUMBERED, "data": {"factory": "numbered.py:numbered_splits", "split": split}, **more}, root=FIXTURES)

    kdcache.extract(spec("test"), str(tmp_path / "eval.zarr"))
    kdcache.extract(spec("train"), str(tmp_path / "train.zarr"))
    p = spec("train", student={"factory": "numbered.py:flat_student"},
             train={"epochs": 1, "batch_size": 16, "device": "cpu", "eval_cache": str(tmp_path / "eval.zarr")})
    call, evaluated = data.call, []

    def interrupted(model, inputs, role):
        if not model.training:  # the first is the probe of the student's output shape, the second the first eval batch
            evaluated.append(len(evaluated))
            if len(evaluated) == 2:
                raise KeyboardInterrupt
        return call(model, inputs, role)

    def making() -> set:
        return {t for t in threading.enumerate() if t.name == "kdcache-prefetch"}

    before = making()
    monkeypatch.setattr(data, "call", interrupted)
    with pytest.raises(KeyboardInterrupt) as raised:
        train(p, str(tmp_path / "train.zarr"), tmp_path / "run")
    deadline = time.monotonic() + 60  # 10 s: tight for processes ending on a loaded box
    while making() - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert raised.value.__traceback__ is not None and making() - before == set()


def test_a_hooked_student_module_is_distilled_as_it_ran(tiny_store):
    """The output of a student's hooked module is kept as the module returned it: an in-place op after it (a ResNet's
    ReLU(inplace=True)) must not change what the feature loss compares with the teacher's layer (whose outputs are kept
    the same way)."""
    p = pipeline("student.factory='bad_input.py:inplace_after_hook'")
    store = layout.open_store(tiny_store)
    run = trainer_setup(p, store)
    x = torch.stack([tiny.dataset()[i][0] for i in range(8)])
    batch = {"inputs": x, "label": torch.zeros(8, dtype=torch.int64),
             "targets": {path: torch.from_numpy(store.read(path, 0, 8)) for path in run.paths}}
    run.losses(batch)
    distilled = run.hooked["conv"]
    with torch.no_grad():
        conv = run.student.conv(x)
    assert (conv < 0).any()  # the ReLU after it would have changed these
    torch.testing.assert_close(distilled, conv)


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad=True:UserWarning")  # torch's, on the reentrant case
@pytest.mark.parametrize("reentrant", [True, False])
def test_a_feature_without_gradient_is_refused_though_its_head_has_one(tiny_store, reentrant):
    """A student module run inside a reentrant torch.utils.checkpoint (Hugging Face's gradient checkpointing) gives its
    hook an output without gradient: with a projection head the feature term still had one, the head's, so the run trained
    the head alone against the teacher's layer and never the student, silently. Refused in one line; not reentrant, trained."""
    trainer = importlib.import_module("kdcache.train")
    p = pipeline(f"student.factory='bad_input.py:checkpointed{'' if reentrant else '_not_reentrant'}'")
    store = layout.open_store(tiny_store)
    run = trainer_setup(p, store)
    assert list(run.heads)  # conv's 4 channels onto the teacher's 16
    run.student.train()
    x = torch.stack([tiny.dataset()[i][0] for i in range(8)])
    batch = {"inputs": x, "label": torch.zeros(8, dtype=torch.int64), "rows": np.arange(8),
             "targets": {path: torch.from_numpy(store.read(path, 0, 8)) for path in run.paths}}
    if reentrant:
        with pytest.raises(kdcache.errors.ModelError, match=r"loss term 'feat:features.3' does not depend on the student's parameters: "
                           r"the output of student module 'conv' carries no gradient .*use_reentrant=True"):
            trainer._step_losses(run, batch)
        return
    trainer._step_losses(run, batch)["feat:features.3"].backward()
    assert run.student.conv.weight.grad.abs().sum() > 0


def trainer_setup(p: kdcache.Pipeline, store: layout.Store) -> Run:
    trainer = importlib.import_module("kdcache.train")
    torch.manual_seed(0)
    return trainer.setup(p, store, tiny.dataset(), torch.device("cpu"))


@pytest.mark.slow
def test_ctrl_c_says_what_is_kept(tiny_store, tmp_path):
    """Ctrl-C is one line, exit 130, saying how to go on: after this run saved an epoch, --resume; during the first
    epoch of an --overwrite, that OUT still holds the earlier run, unchanged."""
    out, hold = tmp_path / "run", tmp_path / "hold"
    args = [str(TINY_TOML), "--cache", tiny_store, "--out", str(out), "--epochs", "100", "--no-progress",
            "--set", 'data.factory="numbered.py:tiny_slow"']

    def interrupted(*extra: str, when, env: dict[str, str] | None = None) -> str:
        proc = subprocess.Popen([sys.executable, "-m", "kdcache.cli", "train", *args, *extra], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
        deadline = time.monotonic() + 240  # 120 s: too short for a loaded box's start and first epoch
        while not when():
            assert proc.poll() is None and time.monotonic() < deadline, signal_and_wait(proc, signal.SIGKILL)
            time.sleep(0.02)
        stderr = signal_and_wait(proc, signal.SIGINT)
        assert proc.returncode == 130, stderr
        lines = [line for line in stderr.splitlines() if line.startswith("Error: ")]
        assert len(lines) == 1 and lines[0] == stderr.strip().splitlines()[-1] and "Traceback" not in stderr, stderr
        return lines[0]

    # 100 epochs of 0.2 s: the run is far from its end when the test sees its first checkpoint
    line = interrupted(when=lambda: (out / "checkpoint.pt").exists())
    assert line == "Error: interrupted; its last checkpoint is kept: run it again with --resume to continue"
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # once it holds OUT's lock (taken as its first epoch starts), before it saves a checkpoint: its first epoch's reads
    # past the 40th (the set-up's probes read 22 items before the lock, an epoch 50) wait while HOLD exists (an epoch of
    # 5 s was relied on: a loaded box may end it before the signal lands)
    lock = tmp_path / ".run.kdcache-lock"
    assert not lock.exists()  # the interrupted run let go of it
    hold.touch()
    try:
        line = interrupted("--overwrite", env={"KDCACHE_TEST_HOLD": str(hold), "KDCACHE_TEST_HOLD_AFTER": "40"},
                           when=lambda: lock.exists() and Path(f"{hold}.held").exists())
    finally:
        hold.unlink()
    assert line == (f"Error: interrupted; no checkpoint was saved, so {str(out)!r} still holds the earlier run, unchanged: run the same "
                    "command again to start afresh")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_an_interrupt_while_an_overwrite_replaces_the_earlier_run_says_resume(tmp_path):
    """Ctrl-C after an --overwrite run removed the earlier run's files, before its first checkpoint (saved whole as
    checkpoint.pt.next) was renamed into place: --resume continues it, not 'OUT still holds the earlier run, unchanged'."""
    out = tmp_path / "run"
    out.mkdir()
    started = time.time() - 5
    (out / "checkpoint.pt.next").write_bytes(b"saved by this run")
    assert cli._after_interrupt("train", {"out": str(out), "overwrite": True}, started) == \
        "its last checkpoint is kept: run it again with --resume instead of --overwrite to continue"


def test_an_interrupted_dry_run_says_it_wrote_nothing(tmp_path):
    """extract --dry-run stopped by Ctrl-C was told 'any shards written are kept: run the same command again to resume'
    (no store there to count) or 'no shard was written', as if it were an extract."""
    for out in (None, str(tmp_path / "none.zarr")):
        assert cli._after_interrupt("extract", {"out": out, "dry_run": True}, time.time()) == \
            "a dry run writes nothing: run the same command again"


# ---------------------------------------------------------------------------------------------- steps


@pytest.mark.parametrize(("n", "epochs"), [(3, 1), (10, 2), (15, 3)])
def test_steps_overrides_epochs(tiny_store, tmp_path, steps, n, epochs):
    train(pipeline(*PLAIN, f"train.steps={n}", "train.epochs=50"), tiny_store, tmp_path / "run")  # 7 batches an epoch
    lines = metrics(tmp_path / "run")
    assert len(steps) == n and lines[-1]["step"] == n and len(lines) == epochs
    # the cosine schedule spans the N steps: the last one takes the rate of step N - 1 of N (it reaches 0 after it)
    assert lines[-1]["lr"] == pytest.approx(0.01 * 0.5 * (1 + np.cos(np.pi * (n - 1) / n)), rel=1e-12)


def test_epochs_beyond_their_limit_are_taken_where_steps_override_them(tiny_store, tmp_path, steps):
    """train.epochs' limit (1,000,000: each epoch's batches are counted before the first step) refused a pipeline whose
    train.steps > 0 overrides its epochs, which are then not counted, pointing to train.steps, which it gave."""
    train(pipeline(*PLAIN, "train.steps=3", "train.epochs=1000000000000"), tiny_store, tmp_path / "run")
    assert len(steps) == 3 and metrics(tmp_path / "run")[-1]["step"] == 3


def test_an_epoch_s_logged_lr_is_the_rate_its_last_step_took(tiny_store, tmp_path, monkeypatch):
    """metrics.jsonl's lr is the learning rate the epoch's last step was taken with (it was the next step's: the rate of
    a step the line does not count, 0 at the end of a cosine schedule), a resumed epoch's too."""
    lrs, step = [], torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: (lrs.append(self.param_groups[0]["lr"]), step(self, *a, **k))[1])
    train_cut_after_first_epoch(pipeline(*PLAIN, "train.epochs=3"), tiny_store, tmp_path / "run")
    train(pipeline(*PLAIN, "train.epochs=3"), tiny_store, tmp_path / "run", resume=True)
    lines = metrics(tmp_path / "run")
    assert [m["step"] for m in lines] == [7, 14, 21] and len(lrs) == 21
    assert [m["lr"] for m in lines] == [lrs[m["step"] - 1] for m in lines]
    assert lines[-1]["lr"] > 0


@pytest.mark.parametrize("extra", [(), ("train.streams=2",), ("train.subset=20",)], ids=["uneven-last-batch", "streams", "subset"])
def test_an_epoch_s_logged_losses_are_their_means_over_its_rows(tiny_store, tmp_path, steps, extra):
    """A step's loss is the mean over its rows: the epoch's is the mean over every row it trained on, so a short last
    batch (50 rows in batches of 8: six of 8, one of 2) counts for its 2 rows, not as much as a batch of 8."""
    train(pipeline(*PLAIN, "train.epochs=2", *extra), tiny_store, tmp_path / "run")
    assert len({len(s["rows"]) for s in steps}) > 1  # the premise: batches of different sizes
    done = 0
    for line in metrics(tmp_path / "run"):
        epoch, done = steps[done : line["step"]], line["step"]
        rows = [len(s["rows"]) for s in epoch]
        assert line["loss"] == pytest.approx(sum(s["loss"] * n for s, n in zip(epoch, rows)) / sum(rows), rel=1e-5)


def test_epochs_are_whole_when_streaming_batch_counts_vary(tiny_store, tmp_path, steps):
    """Streaming buffers group shards differently each epoch (48+2 rows or 34+16 in batches of 20:
    4 or 3 batches); every epoch is still served whole, and exactly train.epochs of them."""
    p = pipeline(*PLAIN, "train.memory_budget_mb=0", "train.shuffle_buffer_shards=3", "train.batch_size=20", "train.epochs=6")
    transfer = TransferSet(tiny_store, tiny.dataset(), [layout.LOGITS], batch_size=20, memory_budget_mb=0, buffer_shards=3)
    counts = [transfer.batches_per_epoch(e) for e in range(6)]
    assert len(set(counts)) > 1  # the premise: batch counts do vary
    train(p, tiny_store, tmp_path / "run")
    lines = metrics(tmp_path / "run")
    assert [m["epoch"] for m in lines] == list(range(6))
    assert [m["step"] for m in lines] == np.cumsum(counts).tolist()
    bounds = np.cumsum([0] + counts)
    for e in range(6):
        rows = np.concatenate([s["rows"] for s in steps[bounds[e] : bounds[e + 1]]])
        assert np.array_equal(np.sort(rows), np.arange(50)), f"epoch {e} serves every row once"


def test_subset_uses_exactly_k_seeded_rows(tiny_store, tmp_path, steps):
    def rows_used(seed: int) -> list[np.ndarray]:
        steps.clear()
        train(pipeline(*PLAIN, "train.subset=20", "train.epochs=2", f"train.seed={seed}"), tiny_store, tmp_path / "run", overwrite=True)
        return [np.concatenate([s["rows"] for s in steps[:3]]), np.concatenate([s["rows"] for s in steps[3:]])]

    first, second = rows_used(0)
    assert len(steps) == 6  # ceil(20 / 8) batches an epoch
    assert len(first) == 20 and len(set(first.tolist())) == 20
    assert set(first.tolist()) == set(second.tolist())
    assert set(rows_used(0)[0].tolist()) == set(first.tolist())  # seeded
    assert set(rows_used(1)[0].tolist()) != set(first.tolist())
    with pytest.raises(PipelineError, match=r"train.subset = 51 exceeds the 50 rows"):
        train(pipeline(*PLAIN, "train.subset=51"), tiny_store, tmp_path / "other")


# ------------------------------------------------------------------------------------------- fidelity


@pytest.fixture(scope="module")
def features32(tmp_path_factory) -> str:
    """tiny.toml with float32 targets: logits and features.3."""
    return extract_tiny(tmp_path_factory.mktemp("stores") / "tiny32-features.zarr", 'targets.dtype="float32"')


@pytest.mark.parametrize(("store", "temperature", "mse_on"), [("tiny_store", 1, "logits"), ("tiny_store", 2, "probabilities"),
                                                             ("tiny_store", 4, "logits"), ("tiny_store", 10, "logits"),
                                                             ("features32", 4, "probabilities")])
def test_each_loss_term_of_each_step_and_its_gradient_are_the_textbook_formulas_on_the_stored_rows(request, tmp_path, graded, store,
                                                                                                  temperature, mse_on):
    """Each step's kl (Hinton et al.: T² · KL(softmax(t/T) ‖ softmax(s/T)), mean over rows), mse (on logits, or Σ_c of
    squared softmax differences), ce and feature MSE through the 1x1-conv head, times their weights, and the gradient of
    their sum with respect to every student and head parameter, against plain-torch float64 formulas of the live teacher's
    outputs (rounded to the store's dtype) for the step's rows; the epoch's logged terms are their means over its 50 rows
    (the last batch of 2 weighing 2), and the head is trained (in the optimizer) and saved."""
    location = request.getfixturevalue(store)
    dtype = torch.float16 if store == "tiny_store" else torch.float32
    p = pipeline("train.eval_split=''", "train.epochs=1", f"train.loss={{kl=1.0, temperature={temperature}, mse=0.5, "
                 f'mse_on="{mse_on}", ce=0.25}}')
    out = tmp_path / "run"
    train(p, location, out)
    teacher, hooked = tiny.teacher().eval(), {}
    teacher.features[3].register_forward_hook(lambda m, i, o: hooked.update(feature=o))
    images = tiny.dataset()
    with torch.no_grad():
        logits = teacher(images.x).to(dtype).double()
    feature = hooked["feature"].to(dtype).double()
    index, T = layout.open_store(location).array(layout.INDEX)[:], float(temperature)
    head = "heads:targets/layers/features%2E3.conv"
    for step in graded:
        items = index[step["batch"]["rows"].numpy()]
        x, y, t = images.x[items].double(), images.y[items], logits[items]
        w = {k: v.double().requires_grad_() for k, v in step["params"].items()}
        conv = F.conv2d(x, w["conv.weight"], w["conv.bias"], padding=1)  # TinyStudent, written out
        s = F.linear(F.relu(conv).flatten(1), w["fc.weight"], w["fc.bias"])
        p_t, p_s = F.softmax(t / T, -1), F.softmax(s / T, -1)
        mse = (s - t).square().mean() if mse_on == "logits" else (p_s - p_t).square().sum(-1).mean()
        reference = {"kl": T * T * (p_t * (p_t.log() - p_s.log())).sum(-1).mean(), "mse": 0.5 * mse,
                     "ce": 0.25 * -F.log_softmax(s, -1)[torch.arange(len(y)), y].mean(),
                     "feat:features.3": 0.1 * (F.conv2d(conv, w[head + ".weight"], w[head + ".bias"]) - feature[items]).square().mean()}
        same_as_reference(step, reference, w)
    line, rows = metrics(out)[-1], [len(s["batch"]["rows"]) for s in graded]
    assert sorted(rows) == [2] + [8] * 6
    for term in graded[0]["parts"]:
        assert line[f"loss_{term}"] == pytest.approx(sum(s["parts"][term] * n for s, n in zip(graded, rows)) / 50, rel=1e-6)
    saved = torch.load(out / "heads.pt", weights_only=True)
    assert not torch.equal(saved["targets/layers/features%2E3.conv.weight"], graded[0]["params"][head + ".weight"])


def live_teacher_losses(p: kdcache.Pipeline, location: str) -> list[float]:
    """The same student trained against the live teacher: same seed, batches and order (TransferSet's plan)."""
    t = p.train
    teacher = tiny.teacher().eval()  # seeds torch itself: build it before seeding the student
    dataset = tiny.dataset(p.data.split)
    index = layout.open_store(location).array(layout.INDEX)[:]
    plan = TransferSet(location, dataset, [layout.LOGITS], batch_size=t.batch_size, seed=t.seed,
                       memory_budget_mb=t.memory_budget_mb, buffer_shards=t.shuffle_buffer_shards)
    torch.manual_seed(t.seed)
    student = tiny.student()
    decayed = [p for p in student.parameters() if p.ndim >= 2]  # biases are not decayed
    rest = [p for p in student.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decayed, "weight_decay": t.weight_decay}, {"params": rest, "weight_decay": 0.0}], lr=t.lr)
    batches = [rows[lo : lo + t.batch_size] for e in range(t.epochs) for rows in plan.plan(e) for lo in range(0, len(rows), t.batch_size)]
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + np.cos(np.pi * min(s, len(batches)) / len(batches))))
    curve = []
    for rows in batches:
        x = dataset.x[index[rows]]
        with torch.no_grad():
            target = teacher(x)
        loss = losses.kl_divergence(student(x), target, t.loss.temperature)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        curve.append(loss.item())
    return curve


@pytest.mark.parametrize(("fixture", "rtol"), [("tiny_store", 1e-2), ("store32", 1e-6)], ids=["float16", "float32"])
def test_cache_training_matches_live_teacher_training(request, tmp_path, steps, fixture, rtol):
    """35 steps: float16 targets stay within 1e-2 of the live teacher's curve (4.6e-4 seen), float32 within 1e-6 (0 seen)."""
    location = request.getfixturevalue(fixture)
    p = pipeline(*PLAIN, "train.loss.ce=0", "train.epochs=5", "train.memory_budget_mb=0", "train.shuffle_buffer_shards=2")
    train(p, location, tmp_path / "run")
    cached = [s["loss"] for s in steps]
    live = live_teacher_losses(p, location)
    assert len(cached) == len(live) == 35
    np.testing.assert_allclose(cached, live, rtol=rtol)
    if fixture == "tiny_store":
        assert cached != live  # the targets really were rounded to float16


@pytest.mark.parametrize("budget", [2048, 0], ids=["memory", "stream"])
def test_dataloader_workers_serve_every_row_once_an_epoch(tiny_store, tmp_path, steps, budget):
    p = pipeline(*PLAIN, "train.num_workers=2", f"train.memory_budget_mb={budget}", "train.shuffle_buffer_shards=1")
    train(p, tiny_store, tmp_path / "run")
    lines = metrics(tmp_path / "run")
    assert len(lines) == 2 and len(steps) == lines[-1]["step"]
    per_epoch = len(steps) // 2
    for e in range(2):
        rows = np.concatenate([s["rows"] for s in steps[e * per_epoch : (e + 1) * per_epoch]])
        assert np.array_equal(np.sort(rows), np.arange(50))


# ------------------------------------------------------------------------------- streaming's memory


def small_machine(monkeypatch, nbytes: int) -> None:
    """This machine, as training sees it, has ``nbytes`` of physical memory; checkpoints are written in the main thread, so
    the targets alone are counted (a background checkpoint's copy: test_a_background_checkpoints_copy_counts_...)."""
    monkeypatch.setattr(cache, "memory_limit", lambda: nbytes)
    monkeypatch.setattr(importlib.import_module("kdcache.train"), "WRITE_IN_BACKGROUND", False)


@pytest.mark.parametrize("memory", [2 * 1600 + 2 * 12816 - 2, 2 * 12816 - 2], ids=["with-the-targets", "alone"])
def test_a_background_checkpoints_copy_that_does_not_fit_is_not_made(tiny_store, tmp_path, monkeypatch, steps, capsys, memory):
    """Targets in RAM (50 rows of 32 bytes) on a machine with room for them, but not for them and the copy a checkpoint
    written in the background holds (the student's 1,068 float32 parameters, AdamW's two moments of each: 12,816 bytes),
    or not for that copy alone: the checkpoints are written in the main thread, from the state itself, with a note, and
    the run trains as it did before that copy was made (was: refused, naming lower train.memory_budget_mb to stream the
    targets, then train.shuffle_buffer_shards or num_workers, none of which made the copy fit: no setting ran it)."""
    import threading

    writers, replace = [], os.replace

    def replaced(src, dst, *args, **kwargs):  # the thread that puts each checkpoint in place
        replace(src, dst, *args, **kwargs)
        if str(dst).endswith(CHECKPOINT):
            writers.append(threading.current_thread().name)

    monkeypatch.setattr(os, "replace", replaced)
    monkeypatch.setattr(cache, "memory_limit", lambda: memory)
    result = train(pipeline(*PLAIN, "train.epochs=1"), tiny_store, tmp_path / "run")
    assert "note: checkpoints are written in the main thread, training paused meanwhile: one written while the next steps train " \
           "holds a copy of the student, heads and optimizer state (12,816 bytes)" in capsys.readouterr().out
    assert len(steps) == 7 and result["step"] == 7 and writers == ["MainThread"]
    monkeypatch.setattr(cache, "memory_limit", lambda: 2 * 1600 + 2 * 12816)  # room for both: written in the background
    train(pipeline(*PLAIN, "train.epochs=1"), tiny_store, tmp_path / "run2")
    assert "note: checkpoints" not in capsys.readouterr().out and writers[1].startswith("kdcache-checkpoint")


def test_a_checkpoint_copys_size_counts_optimizer_state_of_trained_parameters_alone():
    """The host copy a background checkpoint holds: the student's and heads' state (tied weights once) and the optimizer's
    per trained parameter (AdamW: two moments; SGD: its momentum); a frozen parameter has no optimizer state."""
    import types

    from kdcache.train import _checkpoint_copy_bytes

    student = torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.Linear(10, 2))  # 110 + 22 float32 parameters
    run = types.SimpleNamespace(student=student, heads=torch.nn.ModuleDict())
    assert _checkpoint_copy_bytes(run, "adamw") == 4 * 132 * 3 and _checkpoint_copy_bytes(run, "sgd") == 4 * 132 * 2
    student[0].requires_grad_(False)
    assert _checkpoint_copy_bytes(run, "adamw") == 4 * 132 + 4 * 22 * 2


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_a_checkpoint_copy_that_does_not_fit_is_refused_on_a_gpu(tiny_store, monkeypatch, capsys, device):
    """Targets in RAM with room for them but not with a checkpoint's copy: on the CPU the checkpoints are written in the
    main thread, from the state itself; on a GPU the run is refused, naming that copy: each write copies the state to the
    host there, in the main thread too (was: written in the main thread with a note, holding the same copy at each save
    as the background write would, past the half of the memory the check keeps). The student stays on the CPU: the
    device is what the choice looks at (none is here)."""
    import types

    from kdcache.train import _checkpoint_copy_bytes, _dataset, _transfer_set, open_for_training

    p = pipeline(*PLAIN, "train.epochs=1")
    store = open_for_training(tiny_store, False)
    run = types.SimpleNamespace(student=torch.nn.Linear(10, 10), heads=torch.nn.ModuleDict(), device=torch.device(device),
                                paths=["logits"], mask="", mask_where="")  # no train.mask
    copy = _checkpoint_copy_bytes(run, "adamw")
    monkeypatch.setattr(cache, "memory_limit", lambda: 2 * (1600 + copy) - 2)
    made = functools.partial(_transfer_set, p.train, tiny_store, store, np.arange(store.num_shards), _dataset(p, store, "the store"),
                             run, 1)
    if device == "cpu":
        assert made().checkpoint_bytes == 0 and "note: checkpoints are written in the main thread" in capsys.readouterr().out
        return
    with pytest.raises(PipelineError, match=re.escape(f"take 1.562 KiB in RAM, and each checkpoint's write holds a host copy of "
                                                      f"{copy / 1024:.4g} KiB")):
        made()
    assert "note: checkpoints" not in capsys.readouterr().out


def test_targets_that_do_not_fit_without_a_checkpoint_copy_are_refused_naming_the_targets_fix(tiny_store, tmp_path, monkeypatch):
    """Where the targets alone do not fit, the refusal is theirs, with their fix (no checkpoint copy named: it is not made)."""
    monkeypatch.setattr(cache, "memory_limit", lambda: 2 * 1600 - 2)
    with pytest.raises(PipelineError, match=re.escape(f"the targets of {tiny_store!r} take 1.562 KiB in RAM, under "
                                                      "train.memory_budget_mb = 2048 but more than half")):
        train(pipeline(*PLAIN, "train.epochs=1"), tiny_store, tmp_path / "run")


STREAMED = ["train.memory_budget_mb=0", "train.num_workers=2", "train.shuffle_buffer_shards=1"]


def test_streaming_more_than_the_machine_holds_is_refused_before_anything_is_written(tiny_store, tmp_path, monkeypatch, steps):
    """4 shards of 16 rows x 32 bytes read (index, fingerprint, label, float16 logits [4]): 2 DataLoader readers each hold
    the buffer served and the next, of 1 shard each: 4 x 512 B = 2 KiB, more than half of a 3 KiB machine. The run
    stops before its first step, --out not even created; a machine of 4 KiB takes it."""
    small_machine(monkeypatch, 3 * 2**10)
    out = tmp_path / "run"
    with pytest.raises(PipelineError) as raised:
        train(pipeline(*PLAIN, *STREAMED), tiny_store, out)
    assert str(raised.value) == (
        f"streaming the targets of {tiny_store!r} would hold up to 2 KiB at once, more than half of the 3 KiB of "
        "memory this process may use: 4 buffers of 1 shard (train.shuffle_buffer_shards = 1) of 512 B each (16 rows of 32 bytes: the arrays read, "
        "decoded), 2 per reader (the one served and the next, read ahead) and 2 readers (train.num_workers = 2); lower "
        "train.shuffle_buffer_shards or train.num_workers, or re-extract the store with a smaller extract.shard_mb")
    assert not out.exists() and steps == []
    small_machine(monkeypatch, 4 * 2**10)
    train(pipeline(*PLAIN, *STREAMED, "train.epochs=1"), tiny_store, out)
    assert len(steps) == 7


def test_the_memory_check_counts_the_last_batches_of_the_buffer_before(tiny_store, tmp_path, monkeypatch, steps):
    """One reader of 4 buffers of 1 shard (16 rows of 32 bytes), 8-row batches: as the buffer after a buffer is served,
    that buffer's last batches are still made ahead or handed on (the step's), up to 4, each holding its own rows: 2 x
    512 B + 4 x 256 B = 2 KiB, where the check counted the 2 buffers alone (1 KiB, under half of a 3 KiB machine) while
    the batches alive held up to 5 buffers where a buffer made one batch. A machine of 4 KiB takes it."""
    small_machine(monkeypatch, 3 * 2**10)
    out, streamed = tmp_path / "run", ["train.memory_budget_mb=0", "train.num_workers=0", "train.shuffle_buffer_shards=1"]
    with pytest.raises(PipelineError) as raised:
        train(pipeline(*PLAIN, *streamed), tiny_store, out)
    assert str(raised.value) == (
        f"streaming the targets of {tiny_store!r} would hold up to 2 KiB at once, more than half of the 3 KiB of "
        "memory this process may use: 2 buffers of 1 shard (train.shuffle_buffer_shards = 1) of 512 B each (16 rows of 32 bytes: the arrays read, "
        "decoded), 2 per reader (the one served and the next, read ahead, and the last 4 batches of the one before, made ahead or "
        "handed on: 4 batches of up to 256 B (8 rows) in all) and 1 reader (train.num_workers = 0); lower "
        "train.shuffle_buffer_shards or train.num_workers, or re-extract the store with a smaller extract.shard_mb")
    assert not out.exists() and steps == []
    small_machine(monkeypatch, 4 * 2**10)
    train(pipeline(*PLAIN, *streamed, "train.epochs=1"), tiny_store, out)
    assert len(steps) == 7


def test_the_memory_check_counts_only_the_buffers_an_epoch_makes(tiny_store, tmp_path, monkeypatch):
    """One buffer of all 4 shards (shuffle_buffer_shards 4, more than the store has): 1 buffer held, however many
    readers; the features.3 layer read too adds 2048 bytes a row."""
    small_machine(monkeypatch, 2 * 2**10)
    with pytest.raises(PipelineError, match=r"would hold up to 2 KiB at once, more than half of the 2 KiB of memory this process may use: "
                       r"1 buffer of 4 shards \(train.shuffle_buffer_shards = 8\) of 512 B each .* 1 per reader .* and 3 readers "
                       r"\(train.num_workers = 3\); lower"):
        train(pipeline(*PLAIN, "train.memory_budget_mb=0", "train.num_workers=3", "train.shuffle_buffer_shards=8"), tiny_store,
              tmp_path / "run")
    with pytest.raises(PipelineError, match=r"would hold up to 130 KiB at once, .* 2 buffers of 2 shards \(train.shuffle_buffer_shards"
                       r" = 2\) of 32.5 KiB each \(16 rows of 2080 bytes: the arrays read, decoded\), 2 per reader .* and 1 reader "
                       r"\(train.num_workers = 0\); lower"):
        train(pipeline("train.eval_split=''", "train.memory_budget_mb=0", "train.shuffle_buffer_shards=2"), tiny_store, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_targets_in_ram_and_a_machine_that_does_not_say_are_not_checked(tiny_store, tmp_path, monkeypatch, steps):
    """Targets read whole into RAM (under train.memory_budget_mb, 50 rows of 32 bytes) hold no buffers: only their own
    size is checked; where the OS gives no figure nothing is. Either way the run is the one it was: the same batches
    as an unchecked run."""
    real = cache.memory_limit
    small_machine(monkeypatch, 2 * 1600)
    train(pipeline(*PLAIN, "train.epochs=1"), tiny_store, tmp_path / "ram")
    in_ram = [s["rows"] for s in steps]
    small_machine(monkeypatch, None)
    train(pipeline(*PLAIN, *STREAMED, "train.epochs=1"), tiny_store, tmp_path / "unknown")
    monkeypatch.setattr(cache, "memory_limit", real)
    assert cache.memory_limit() > 2**20  # the real figure, on Linux
    train(pipeline(*PLAIN, *STREAMED, "train.epochs=1"), tiny_store, tmp_path / "real")
    assert len(in_ram) == 7 and len(steps) == 21
    assert all(np.array_equal(a["rows"], b["rows"]) for a, b in zip(steps[7:14], steps[14:21]))


def test_targets_that_fit_the_budget_but_not_the_machine_are_refused_before_they_are_read(tiny_store, tmp_path, monkeypatch, steps):
    """train.memory_budget_mb set for a larger machine (or a container's limit): reading 1600 bytes of targets into RAM
    with 3 KiB to use would pass half of it; refused before the read, --out untouched; streamed in batches of 2, the run
    fits (1.25 KiB: two buffers of a 16-row shard, and the last 4 batches of the one before; in batches of 8 those would
    take 1 KiB, 2 KiB in all: refused too, test_the_memory_check_counts_the_last_batches_of_the_buffer_before)."""
    small_machine(monkeypatch, 3 * 2**10)
    reads = []
    real_read, real_read_shards = layout.Store.read, layout.Store.read_shards
    monkeypatch.setattr(layout.Store, "read", lambda self, *a, **k: reads.append(a) or real_read(self, *a, **k))
    monkeypatch.setattr(layout.Store, "read_shards", lambda self, path, shards, **k: reads.append(  # the rows they span
        (path, self.shard_rows(shards[0])[0], self.shard_rows(shards[-1])[1]) if shards else (path, 0, 0)) or real_read_shards(self, path, shards, **k))
    with pytest.raises(PipelineError) as raised:
        train(pipeline(*PLAIN), tiny_store, tmp_path / "run")
    assert str(raised.value) == (f"the targets of {tiny_store!r} take 1.562 KiB in RAM, under train.memory_budget_mb = 2048 but more "
                                 "than half of the 3 KiB of memory this process may use; lower train.memory_budget_mb below 0.001526 to "
                                 "stream them (whole shards, a few at a time)")
    assert not (tmp_path / "run").exists() and steps == [] and not [a for a in reads if a[1:] == (0, 50)]
    train(pipeline(*PLAIN, "train.memory_budget_mb=0", "train.shuffle_buffer_shards=1", "train.batch_size=2", "train.epochs=1"),
          tiny_store, tmp_path / "run")
    assert len(steps) == 25


def test_a_pathlib_cache_trains_as_its_string_does(tiny_store, tmp_path):
    """--cache may be a pathlib.Path, streamed too (the streaming reads raised TypeError on a Path), and names it as a string."""
    p = pipeline(*PLAIN, "train.memory_budget_mb=0", "train.epochs=1")
    train(p, Path(tiny_store), tmp_path / "path")
    train(p, tiny_store, tmp_path / "str")
    weights = [torch.load(tmp_path / run / "student.pt", weights_only=True) for run in ("path", "str")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[1])
    with pytest.raises(StoreError, match=re.escape(f"{str(tmp_path / 'none.zarr')!r}")):
        train(p, tmp_path / "none.zarr", tmp_path / "none")


def test_torchrun_ranks_on_one_machine_each_read_the_targets_into_ram(tiny_store, monkeypatch):
    """Under torchrun every rank reads its own copy: 2 local ranks of 1600 bytes (logits and sample arrays) are more
    than half of 5 KiB, 2 ranks on two machines (one each) are not."""
    import tiny

    small_machine(monkeypatch, 5 * 2**10)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(PipelineError, match=r"take 1.562 KiB in RAM in each of 2 ranks on this machine, under train.memory_budget_mb = 1 "
                       r"but more than half of the 5 KiB"):
        TransferSet(tiny_store, tiny.dataset(), [layout.LOGITS], batch_size=20, memory_budget_mb=1, streams=2, stream=0)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert TransferSet(tiny_store, tiny.dataset(), [layout.LOGITS], batch_size=20, memory_budget_mb=1, streams=2, stream=0).in_memory


def test_the_memory_a_process_may_use_is_its_cgroups_limit_where_lower(tmp_path):
    """A container's limit kills as the machine's memory does: cgroup v2 (``0::PATH`` → ``memory.max``) and v1
    (``N:memory:PATH`` → ``memory/PATH/memory.limit_in_bytes``), in the process's own folder or, where the container's
    cgroup is mounted as the root, the root's; ``max`` and v1's unlimited (2**63 rounded to pages) are no limit."""
    def fs(files: dict[str, str]) -> Path:
        root = tmp_path / str(len(list(tmp_path.iterdir())))
        for name, text in files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text(text + "\n")
        return root

    v2 = "0::/kubepods/pod1/c1"
    assert cache.cgroup_memory_limit(v2, fs({"kubepods/pod1/c1/memory.max": "1073741824"})) == 2**30
    assert cache.cgroup_memory_limit(v2, fs({"memory.max": "536870912"})) == 2**29  # namespaced: the root is the container's
    assert cache.cgroup_memory_limit(v2, fs({"kubepods/pod1/c1/memory.max": "max", "memory.max": "5"})) is None
    v1 = "9:pids:/\n4:memory:/docker/abc\n0::/"
    assert cache.cgroup_memory_limit(v1, fs({"memory/docker/abc/memory.limit_in_bytes": "2147483648"})) == 2**31
    assert cache.cgroup_memory_limit(v1, fs({"memory/memory.limit_in_bytes": "4294967296"})) == 2**32
    assert cache.cgroup_memory_limit(v1, fs({"memory/docker/abc/memory.limit_in_bytes": "9223372036854771712"})) is None
    assert cache.cgroup_memory_limit("4:cpu,memory:/a", fs({"memory/a/memory.limit_in_bytes": "1000"})) == 1000
    assert cache.cgroup_memory_limit(v1, fs({})) is None and cache.cgroup_memory_limit("", fs({})) is None
    assert cache.cgroup_memory_limit("garbage\n4:memory", fs({})) is None
    # the kernel enforces every ancestor's limit: a Slurm job's (cgroup v2: its task's own folder says max), a pod's
    slurm = "0::/system.slice/slurmstepd.scope/job_7/step_0/user/task_0"
    job = "system.slice/slurmstepd.scope/job_7"
    assert cache.cgroup_memory_limit(slurm, fs({f"{job}/step_0/user/task_0/memory.max": "max", f"{job}/step_0/user/memory.max": "max",
                                                f"{job}/step_0/memory.max": "3221225472", f"{job}/memory.max": "4294967296"})) == 3 * 2**30
    assert cache.cgroup_memory_limit(v2, fs({"kubepods/pod1/c1/memory.max": "max", "kubepods/pod1/memory.max": "2147483648"})) == 2**31
    assert cache.cgroup_memory_limit(v1, fs({"memory/docker/abc/memory.limit_in_bytes": "9223372036854771712",
                                             "memory/docker/memory.limit_in_bytes": "1073741824"})) == 2**30


def test_an_eval_cache_that_would_not_fit_is_refused_before_the_first_epoch(tiny_store, test_store, tmp_path, monkeypatch, steps):
    """train.eval_cache streams in the main process too (its 50 rows of logits and sample arrays, 1600 bytes, exceed
    the budget), in buffers of train.shuffle_buffer_shards shards; the training run reads no logits (ce alone): its
    1200 bytes are in RAM, within half of the machine's 3 KiB."""
    small_machine(monkeypatch, 3 * 2**10)
    with pytest.raises(PipelineError, match=r"^streaming train.eval_cache '.*tiny-test.zarr' would hold up to 2 KiB at once, more than "
                       r"half of the 3 KiB of memory this process may use: 1 buffer of 4 shards \(train.shuffle_buffer_shards = 4\) of 512 B each "
                       r"\(16 rows of 32 bytes: the arrays read, decoded\), 1 per reader \(the one served and the next, read ahead\) "
                       r"and 1 reader \(the main process\); lower train.shuffle_buffer_shards"):
        train(pipeline(*PLAIN, f'train.eval_cache="{test_store}"', 'train.eval_split="test"', "train.loss.kl=0",
                       "train.memory_budget_mb=0.0013"),
              tiny_store, tmp_path / "run")
    assert steps == [] and not (tmp_path / "run").exists()


# ------------------------------------------------------------------ checkpoints inside an epoch, and SIGTERM


def sigterm_at_step(monkeypatch, n: int) -> None:
    """A real SIGTERM to this process as step ``n`` (1-based) of any train() in the test begins."""
    calls, losses_of = iter(range(1, 10**9)), Run.losses

    def step(self, batch):
        if next(calls) == n:
            os.kill(os.getpid(), signal.SIGTERM)
        return losses_of(self, batch)

    monkeypatch.setattr(Run, "losses", step)


def same_run(got: Path, want: Path) -> None:
    for name in ("student.pt", "heads.pt"):
        a, b = (torch.load(run / name, weights_only=True) for run in (got, want))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b), name
    assert [m["loss"] for m in metrics(got)] == [m["loss"] for m in metrics(want)]
    assert [m["epoch"] for m in metrics(got)] == [m["epoch"] for m in metrics(want)]


STOPPED = {  # how the run reads its batches: each must serve a resumed epoch's rest in the uninterrupted order
    "in-memory": (),
    "in-memory-dataloader-workers": ("train.num_workers=2",),
    "streaming": ("train.memory_budget_mb=0", "train.shuffle_buffer_shards=1"),
    "streaming-dataloader-workers": ("train.memory_budget_mb=0", "train.shuffle_buffer_shards=1", "train.num_workers=2"),
    "streams": ("train.streams=2", "train.memory_budget_mb=0", "train.shuffle_buffer_shards=1"),
}


@pytest.mark.parametrize("how", list(STOPPED))
def test_sigterm_mid_epoch_saves_a_checkpoint_that_resumes_to_the_uninterrupted_run(tiny_store, tmp_path, monkeypatch, how):
    """A scheduler's SIGTERM (preemption, a time limit): the run finishes its step, saves a checkpoint inside the
    epoch and stops with one line; --resume then trains the rest of that epoch's batches in their order and reaches
    the uninterrupted run's weights and per-epoch losses exactly (dropout: the RNG is restored mid-epoch too)."""
    p = pipeline("student.factory='bad_input.py:dropping'", *PLAIN, "train.epochs=3", *STOPPED[how])
    train(p, tiny_store, tmp_path / "whole")
    handler = signal.getsignal(signal.SIGTERM)
    sigterm_at_step(monkeypatch, 10)
    with pytest.raises(kdcache.errors.TrainingStopped) as stopped:
        train(p, tiny_store, tmp_path / "cut")
    assert signal.getsignal(signal.SIGTERM) is handler, "train() put back the SIGTERM handler it found"
    ckpt = torch.load(tmp_path / "cut" / CHECKPOINT, weights_only=True)
    done = metrics(tmp_path / "cut")  # the epochs before: step 10 falls in epoch 1 (7 steps an epoch), 2 with streams (4)
    assert (ckpt["step"], ckpt["epoch"], ckpt["batch"]) == (10, len(done), 10 - done[-1]["step"]) and ckpt["batch"] > 0
    assert str(stopped.value) == (f"stopped by SIGTERM in epoch {len(done)} after batch {ckpt['batch']} (step 10 of "
                                  f"{metrics(tmp_path / 'whole')[-1]['step']}); "
                       f"its checkpoint is saved in {str(tmp_path / 'cut')!r}: call kdcache.train again with resume=True to continue")
    assert not (tmp_path / "cut" / "student.pt").exists()
    monkeypatch.undo()
    train(p, tiny_store, tmp_path / "cut", resume=True)
    same_run(tmp_path / "cut", tmp_path / "whole")


@pytest.mark.parametrize("at", [7, 14])
def test_sigterm_in_an_epoch_s_last_step_stops_at_its_end_and_in_the_plan_s_last_step_finishes(tiny_store, tmp_path, monkeypatch, at):
    """A SIGTERM as an epoch's last batch trains (step 7 of 14: 7 steps an epoch) stops the run at the epoch's own
    checkpoint, with its line, and --resume reaches the uninterrupted run; one in the plan's last step (14) has nothing
    left to stop: the run finishes, its weights written."""
    p = pipeline("student.factory='bad_input.py:dropping'", *PLAIN, "train.epochs=2")
    train(p, tiny_store, tmp_path / "whole")
    sigterm_at_step(monkeypatch, at)
    if at == 14:
        assert train(p, tiny_store, tmp_path / "cut")["epoch"] == 1 and (tmp_path / "cut" / "student.pt").exists()
    else:
        with pytest.raises(kdcache.errors.TrainingStopped) as stopped:
            train(p, tiny_store, tmp_path / "cut")
        assert str(stopped.value) == ("stopped by SIGTERM after epoch 0 (step 7 of 14); its checkpoint is saved in "
                                      f"{str(tmp_path / 'cut')!r}: call kdcache.train again with resume=True to continue")
        ckpt = torch.load(tmp_path / "cut" / CHECKPOINT, weights_only=True)
        assert (ckpt["epoch"], ckpt["batch"], ckpt["step"]) == (1, 0, 7) and [m["epoch"] for m in metrics(tmp_path / "cut")] == [0]
        assert not (tmp_path / "cut" / "student.pt").exists()
        monkeypatch.undo()
        train(p, tiny_store, tmp_path / "cut", resume=True)
    same_run(tmp_path / "cut", tmp_path / "whole")


@pytest.mark.parametrize("at", [7, 14])
def test_sigterm_in_an_epoch_s_last_step_saves_its_steps_and_leaves_its_evaluation_to_the_resume(tiny_store, tmp_path, monkeypatch, at):
    """With an evaluation due at the epoch's end (train.eval_split), a SIGTERM in its last step stops the run before it
    evaluates (an evaluation may outlast a scheduler's grace, or hang on its reads): the checkpoint keeps every step of the
    epoch, at its last batch, without its line; --resume evaluates it, writes the line the uninterrupted run wrote and
    goes on (in the plan's last step: only that)."""
    p = pipeline("student.factory='bad_input.py:dropping'", "train.features={}", "train.epochs=2")
    whole, cut, epoch = tmp_path / "whole", tmp_path / "cut", at // 7 - 1
    train(p, tiny_store, whole)
    sigterm_at_step(monkeypatch, at)
    with pytest.raises(kdcache.errors.TrainingStopped) as stopped:
        train(p, tiny_store, cut)
    assert str(stopped.value).startswith(f"stopped by SIGTERM in epoch {epoch} after batch 7 (step {at} of 14); its checkpoint is saved"), stopped.value
    ckpt = torch.load(cut / CHECKPOINT, weights_only=True)
    assert (ckpt["epoch"], ckpt["batch"], ckpt["step"]) == (epoch, 7, at)
    assert ([m["epoch"] for m in metrics(cut)] == [0]) if epoch else not (cut / "metrics.jsonl").exists()
    monkeypatch.undo()
    train(p, tiny_store, cut, resume=True)
    same_run(cut, whole)
    assert [m["eval_accuracy"] for m in metrics(cut)] == [m["eval_accuracy"] for m in metrics(whole)]


def test_checkpoint_every_saves_inside_epochs_and_a_crash_after_one_resumes_there(tiny_store, tmp_path, monkeypatch, capsys):
    """train.checkpoint_every = 3: checkpoints at steps 3, 6, 9, ... besides each epoch's end; the result is the run's
    without them; a crash right after the one at step 9 (epoch 1, batch 2) resumes from there."""
    p = pipeline(*PLAIN, "train.epochs=3", "train.checkpoint_every=3")
    train(pipeline(*PLAIN, "train.epochs=3"), tiny_store, tmp_path / "plain")
    trainer = importlib.import_module("kdcache.train")  # the module (kdcache.train is the function)
    saves, save = [], trainer._save_epoch

    def recorded(*args, **kwargs):
        save(*args, **kwargs)
        state = args[4]
        saves.append((state["epoch"], state["batch"], state["step"]))
        if "cut" in str(args[0]) and state["step"] == 9:
            raise KeyboardInterrupt  # as a crash would stop it, right after the checkpoint
    monkeypatch.setattr(trainer, "_save_epoch", recorded)
    train(p, tiny_store, tmp_path / "every")
    assert saves == [(0, 3, 3), (0, 6, 6), (1, 0, 7), (1, 2, 9), (1, 5, 12), (2, 0, 14), (2, 1, 15), (2, 4, 18), (3, 0, 21)]
    same_run(tmp_path / "every", tmp_path / "plain")
    with pytest.raises(KeyboardInterrupt):
        train(p, tiny_store, tmp_path / "cut")
    capsys.readouterr()
    train(p, tiny_store, tmp_path / "cut", resume=True)
    assert f"resuming {str(tmp_path / 'cut')!r} in epoch 1 after batch 2 (step 9 of 21)" in capsys.readouterr().out
    same_run(tmp_path / "cut", tmp_path / "plain")


def test_an_epochs_checkpoint_reaches_the_disk_while_the_next_epoch_trains(tiny_store, tmp_path, monkeypatch):
    """An epoch's checkpoint files are written and flushed to the disk (fsyncs: milliseconds each, tens on a busy disk)
    while the next epoch's steps train, from copies of the state taken at the epoch's end: the run is the one saved
    in turn (its weights, metrics and checkpoint), and a write's error still ends the run in one line (was: every step
    waited for the disk at each epoch's end)."""
    train(pipeline(*PLAIN, "train.epochs=3"), tiny_store, tmp_path / "plain")
    trainer = importlib.import_module("kdcache.train")
    save, save_epoch, losses, steps, saved_at, overlapped = trainer._save, trainer._save_epoch, Run.losses, [], [], []

    def counted(self, batch):
        steps.append(1)
        return losses(self, batch)

    def asked(*args, **kwargs):  # the steps taken when the save was asked for
        saved_at.append(len(steps))
        save_epoch(*args, **kwargs)

    def slow(obj, path, *abandoned):  # epoch 0's checkpoint: waits (up to 60 s) for a step of epoch 1 before it is written
        if path.name == CHECKPOINT and obj["epoch"] == 1:
            deadline = time.monotonic() + 60  # 5 s: a loaded box may not run the next step that soon
            while len(steps) == saved_at[0] and time.monotonic() < deadline:
                time.sleep(0.005)
            overlapped.append(len(steps) > saved_at[0])
        save(obj, path, *abandoned)

    with monkeypatch.context() as m:
        m.setattr(Run, "losses", counted)
        m.setattr(trainer, "_save_epoch", asked)
        m.setattr(trainer, "_save", slow)
        train(pipeline(*PLAIN, "train.epochs=3"), tiny_store, tmp_path / "run")
    assert overlapped == [True]
    same_run(tmp_path / "run", tmp_path / "plain")
    a, b = (torch.load(run / CHECKPOINT, weights_only=True) for run in (tmp_path / "run", tmp_path / "plain"))
    assert all(torch.equal(a["student"][k], b["student"][k]) for k in b["student"]) and a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    assert all(torch.equal(a["optimizer"]["state"][i][k], v) for i, s in b["optimizer"]["state"].items() for k, v in s.items())

    def full_disk(obj, path, *abandoned):
        if path.name == CHECKPOINT and obj["epoch"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        save(obj, path, *abandoned)

    with monkeypatch.context() as m:
        m.setattr(trainer, "_save", full_disk)
        with pytest.raises(OSError, match="No space left on device"):
            train(pipeline(*PLAIN, "train.epochs=3"), tiny_store, tmp_path / "full")
    assert [m["epoch"] for m in metrics(tmp_path / "full")] == [0, 1]  # the checkpoint failed after its line was written


@pytest.mark.parametrize("case, args, early", [
    ("in-memory", (), {1, 2}),
    ("streaming", ("train.memory_budget_mb=0", "train.shuffle_buffer_shards=1"), set()),
    ("in-memory-evaluated", ("train.eval_split='test'", "train.eval_every=2"), {1}),  # epoch 1 ends with an evaluation
])
def test_in_ram_an_epochs_batches_are_started_during_the_last_epochs_last_steps(tiny_store, tmp_path, monkeypatch, case, args, early):
    """In RAM without a DataLoader, the next epoch's batches are started by a thread other than the steps' as the batch
    made ``cache.PREFETCH`` before an epoch's last is taken: its first ones are made during the last steps and the
    checkpoint's save, not waited for after them (was: the next epoch's iterator, and its thread, started by the steps'
    thread after the epoch's end). The run is the one trained without that (weights, losses, metrics). Streaming (the
    last buffer's batches still hold it) and before an evaluation (its dataset read beside the batches) the next epoch
    starts after the epoch, as before."""
    trainer = importlib.import_module("kdcache.train")
    p = pipeline(*PLAIN, "train.epochs=3", "train.batch_size=16", *args)
    n = -(-layout.open_store(tiny_store).num_samples // 16)  # batches an epoch
    started_at, losses_of, iterate = {}, Run.losses, TransferSet.__iter__

    def step(self, batch):
        taken = step.count
        if taken % n == n - 1 - cache.PREFETCH and taken // n + 1 in early:  # its next epoch is started meanwhile
            deadline = time.monotonic() + 30  # a loaded box may not run the starting thread at once
            while taken // n + 1 not in started_at and time.monotonic() < deadline:
                time.sleep(0.002)
        step.count += 1
        return losses_of(self, batch)

    def started(self):  # the steps taken when epoch e's batches were started, and by which thread
        started_at[self.epoch] = (step.count, threading.current_thread() is threading.main_thread())
        return iterate(self)

    step.count = 0
    with monkeypatch.context() as m:
        m.setattr(Run, "losses", step)
        m.setattr(TransferSet, "__iter__", started)
        train(p, tiny_store, tmp_path / "run")
    assert n > cache.PREFETCH + 1 and step.count == 3 * n == metrics(tmp_path / "run")[-1]["step"]
    assert started_at == {0: (0, True), **{e: (e * n - 1 - cache.PREFETCH, False) if e in early else (e * n, True) for e in (1, 2)}}
    monkeypatch.setattr(trainer, "_ahead", lambda *a: None)
    train(p, tiny_store, tmp_path / "after")
    same_run(tmp_path / "run", tmp_path / "after")
    assert [{k: v for k, v in m.items() if "seconds" not in k} for m in metrics(tmp_path / "run")] == \
        [{k: v for k, v in m.items() if "seconds" not in k} for m in metrics(tmp_path / "after")]


@pytest.mark.parametrize("case, args, error", [
    ("in-memory", (), RuntimeError("can't start new thread")),  # started ahead by another thread (_ahead)
    ("streaming", ("train.memory_budget_mb=0", "train.shuffle_buffer_shards=1"), StoreError("the store's first buffer")),
    ("saying-rerun", (), DataError("the dataset raised OSError: share unmounted reading index 3; fix data.factory's dataset, then rerun")),
])
def test_an_error_starting_the_next_epochs_batches_is_raised_once_the_epoch_is_saved(tiny_store, tmp_path, case, args, error):
    """An error starting the next epoch's batches is raised once the epoch that ended is saved (its metrics line and
    checkpoint), saying the checkpoint keeps it: --resume goes on from there. Was: raised before the save, the epoch's
    training lost (a rerun trained it again). An error whose own advice is "rerun" has it said as every failure after a
    checkpoint says it (``_go_on``); was: "…, then rerun (raised as …: fix this, then call kdcache.train again with
    resume=True to go on from there)", two fixes, the first refused."""
    p = pipeline(*PLAIN, "train.epochs=2", "train.batch_size=16", *args)
    iterate = TransferSet.__iter__

    def failing(self):
        if self.epoch == 1:
            raise error
        return iterate(self)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(TransferSet, "__iter__", failing)
        with pytest.raises(type(error)) as raised:
            train(p, tiny_store, tmp_path / "run")
    said = str(raised.value) if isinstance(error, (StoreError, DataError)) else " ".join(getattr(raised.value, "__notes__", []))
    if case == "saying-rerun":
        assert said.endswith("fix data.factory's dataset, then call kdcache.train again with resume=True to go on from its last "
                             "checkpoint (after epoch 0; raised as the next epoch's batches were started)") and "rerun" not in said, said
    else:
        assert "as the next epoch's batches were started" in said and "keeps the run after epoch 0" in said, said
    assert [line["epoch"] for line in metrics(tmp_path / "run")] == [0]
    assert torch.load(tmp_path / "run" / CHECKPOINT, weights_only=True)["step"] == metrics(tmp_path / "run")[0]["step"]
    train(p, tiny_store, tmp_path / "run", resume=True)
    train(p, tiny_store, tmp_path / "whole")
    assert [line["epoch"] for line in metrics(tmp_path / "run")] == [0, 1]
    same_run(tmp_path / "run", tmp_path / "whole")


def test_a_ctrl_c_waiting_for_the_next_epochs_batches_started_early_stops_them(tiny_store, tmp_path, monkeypatch):
    """A Ctrl-C (a real SIGINT) while the steps' thread waits for the next epoch's batches, started during the epoch's last
    steps (in RAM, no DataLoader), stops them as train raises. Was: their iterator, taken out of the run's list before it
    was waited for, was stopped by nobody: its thread went on making batches as long as anything held it."""
    trainer = importlib.import_module("kdcache.train")
    start_after, started, main = trainer._start_after, [], threading.main_thread()

    def waiting() -> bool:  # the steps' thread is in Future.result()
        frame = sys._current_frames().get(main.ident)
        while frame is not None and not (frame.f_code.co_name == "result" and "concurrent" in frame.f_code.co_filename):
            frame = frame.f_back
        return frame is not None

    def start_then_interrupt(*args):
        batches = start_after(*args)
        started.append(batches)
        deadline = time.monotonic() + 30  # the steps' thread takes the epoch's last steps first
        while not waiting() and time.monotonic() < deadline:
            time.sleep(0.002)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.5)  # the SIGINT taken while it waits, not once it has the batches
        return batches

    def making() -> set:
        return {t for t in threading.enumerate() if t.name == "kdcache-prefetch"}

    before = making()
    monkeypatch.setattr(trainer, "_start_after", start_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        train(pipeline(*PLAIN, "train.epochs=2", "train.batch_size=16"), tiny_store, tmp_path / "run")
    deadline = time.monotonic() + 60  # 10 s: tight for threads ending on a loaded box
    while making() - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(started) == 1 and making() - before == set()
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # interrupted in the wait, before the first epoch's save


def test_in_ram_the_next_epochs_batches_started_early_read_the_dataset_once_this_epochs_are_made(tiny_store, tmp_path, monkeypatch):
    """The next epoch's batches, started during an epoch's last steps (in RAM, no DataLoader), are made once the epoch's
    own are all made: the dataset is read by one thread at a time, as before they were started early. Was: their thread
    read it beside the one making the epoch's last batches, and a dataset read as from one open file (a seek, then the
    read) served about 40 of 4 epochs' 200 rows another item's input, with the targets of the row asked for: unchecked
    past the first epoch at train.fingerprint_recheck 0 (0.05 checks few), and in the first named as random augmentation."""
    import numbered

    p = pipeline(*PLAIN, "train.epochs=4", "train.batch_size=8", 'data.factory="numbered.py:tiny_one_cursor"',
                 "train.fingerprint_check=0", "train.fingerprint_recheck=0")
    truth, wrong, losses_of = tiny.TinyImages("train"), [], Run.losses

    def step(self, batch):
        wrong.extend(i for i, x in zip(batch["index"].tolist(), batch["inputs"]) if not torch.equal(x, truth.x[i]))
        return losses_of(self, batch)

    monkeypatch.setattr(Run, "losses", step)
    monkeypatch.setattr(numbered.OneCursor, "most", 0)
    train(p, tiny_store, tmp_path / "run")
    assert metrics(tmp_path / "run")[-1]["step"] == 4 * 7 and wrong == [] and numbered.OneCursor.most == 1


def test_a_run_that_raises_has_no_thread_reading_the_dataset_once_it_returns(tiny_store, tmp_path, monkeypatch):
    """A run that fails in a step waits for the batch its thread was making: once train raises, nothing of it reads the
    dataset, which the caller may read next (a run resumed in the same process, a factory handing out one open file).
    Was: the thread stopped at its next hand-off, after train had raised, and read the dataset beside the resumed run's
    checks (found by tests/fuzz_alignment.py: a dataset read as from one open file served one item for another's)."""
    import numbered

    p = pipeline(*PLAIN, "train.batch_size=4", 'data.factory="numbered.py:tiny_slow_reads"', "train.fingerprint_check=0",
                 "train.fingerprint_recheck=0")
    losses_of, taken = Run.losses, []

    def step(self, batch):
        taken.append(batch["index"])
        if len(taken) == 2:
            raise RuntimeError("the step failed")
        return losses_of(self, batch)

    monkeypatch.setattr(Run, "losses", step)
    monkeypatch.setattr(numbered.SlowReads, "ended", [])
    with pytest.raises(RuntimeError, match="the step failed"):
        train(p, tiny_store, tmp_path / "run")
    returned = time.monotonic()
    time.sleep(0.5)
    assert numbered.SlowReads.ended and max(numbered.SlowReads.ended) <= returned


def test_a_checkpoint_written_in_the_background_keeps_tied_weights_one_tensor(tiny_store, tmp_path, monkeypatch):
    """A student's tied weights (one tensor under two names) stay one tensor in a checkpoint written from copies, as in one
    written in the main thread (was: each name copied apart, the tied weights saved twice and held twice in RAM)."""
    args = (*PLAIN, "train.epochs=1", "student.factory='tiny.py:tied_student'")
    train(pipeline(*args), tiny_store, tmp_path / "background")
    monkeypatch.setattr(importlib.import_module("kdcache.train"), "WRITE_IN_BACKGROUND", False)
    train(pipeline(*args), tiny_store, tmp_path / "main")
    a, b = (torch.load(tmp_path / run / CHECKPOINT, weights_only=True) for run in ("background", "main"))
    assert a["student"].keys() == b["student"].keys() and all(torch.equal(a["student"][k], v) for k, v in b["student"].items())
    for ckpt in (a, b):
        assert ckpt["student"]["tied.weight"].untyped_storage().data_ptr() == ckpt["student"]["fc.weight"].untyped_storage().data_ptr()
    assert (tmp_path / "background" / CHECKPOINT).stat().st_size == (tmp_path / "main" / CHECKPOINT).stat().st_size


def test_a_ctrl_c_while_a_checkpoint_write_fails_keeps_the_write_error(tmp_path):
    """A Ctrl-C while the run waits for a checkpoint write, which then fails (a full disk): the write's error is raised,
    naming the Ctrl-C (was: the Ctrl-C alone, and the write's error lost without a word)."""
    import threading

    from kdcache.train import _write_error, _Writes

    writes, started = _Writes(), threading.Event()

    def write():
        started.set()
        writes.abandoned.wait(30)  # a write under way until the Ctrl-C; it fails at its next chunk
        raise _write_error(tmp_path / CHECKPOINT, OSError(errno.ENOSPC, "No space left on device"))

    writes.start(write)
    started.wait(30)
    # a real SIGINT to the main thread, as a Ctrl-C is: it ends the wait (_thread.interrupt_main only sets Python's flag,
    # which a thread blocked in that wait sees once the write is done: after the write's 30 s)
    threading.Timer(0.1, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT)).start()
    try:
        writes.wait()
    except BaseException as e:  # noqa: BLE001 - a KeyboardInterrupt raised here is the failure looked for
        raised = e
    assert isinstance(raised, StoreError), repr(raised)
    assert str(raised).endswith("No space left on device; free space and rerun (the run was ending already: interrupted)")
    assert writes.future is None


def test_more_sigterms_are_the_same_request_and_the_handler_is_put_back(tiny_store, tmp_path):
    """A scheduler may send SIGTERM more than once (Slurm signals every process of a job, torchrun passes its own on to
    the ranks): each only asks for the checkpoint-and-stop again, none ends the run mid-step; the handler found before
    the run is put back after it."""
    from kdcache.train import _stop_requests

    seen, stop = [], {"signal": 0, "agreed": False}
    before = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        with _stop_requests(stop):
            for _ in range(3):
                os.kill(os.getpid(), signal.SIGTERM)
            assert stop["signal"] == signal.SIGTERM and seen == []
        os.kill(os.getpid(), signal.SIGTERM)
        assert seen == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, before)


HELD = {  # how the run reads its batches while a read hangs, the split whose dataset read hangs, and its fetches before the held one
    "in-memory": ((), "train", 150),  # epoch 2's 4th batch
    "a-dataloader-worker": (("train.num_workers=1",), "train", 150),
    "streaming": (("train.memory_budget_mb=0",), "train", 150),
    "the-next-epoch-started-ahead": (("train.eval_split=''",), "train", 171),  # epoch 2's last batch: epoch 3's wait for it (_ahead)
    "the-evaluation": ((), "test", 102),  # train.eval_split's first item in epoch 2's evaluation, read by the main thread
    "an-eval-store-s-evaluation": (("train.eval_cache='{eval_store}'",), "test", 104),  # the same, train.eval_cache's, by its thread
    # streaming from an HTTP server that stops answering: shard 2's logits, read again in epoch 1 (its own hold, no dataset's)
    "a-store-read": (("train.memory_budget_mb=0", "train.shuffle_buffer_shards=1"), "", 0),
}
CTRL_C = [how for how in HELD if how not in ("streaming", "an-eval-store-s-evaluation")]  # Ctrl-C's wait there: in-memory's


@pytest.mark.parametrize("sig, how", [(signal.SIGTERM, how) for how in HELD] + [(signal.SIGINT, how) for how in CTRL_C],
                         ids=[f"sigterm-{how}" for how in HELD] + [f"ctrl-c-{how}" for how in CTRL_C])
def test_a_stop_while_a_read_hangs_ends_the_run_at_once_and_resumes_to_the_uninterrupted_result(tiny_store, test_store, tmp_path,
                                                                                                  request, sig, how):
    """A read that never returns (a stalled network mount, a dead remote dataset, an object store that stops answering) in
    the third epoch: SIGTERM (a scheduler's preemption, SIGKILL after its grace) saves the run as its last step left it and
    exits 143 within that grace, not at the next step, which never comes; Ctrl-C exits 130, its last checkpoint kept.
    Neither waits at exit for the thread or DataLoader worker stuck in the read (a worker ignores SIGTERM: multiprocessing
    waited for it forever; the interpreter joins a pool's thread, a streaming reader's, forever), nor for the next
    epoch's batches started ahead, which wait for this epoch's last to be made (they waited forever). One in an epoch's
    evaluation (SIGTERM only set the stop request, seen after it) saves the epoch's steps, its line and evaluation left to
    the resume. All resume to the uninterrupted run's weights, losses and eval metrics. The dataset read is held until the
    test ends (``numbered.tiny_slow``), the store read by ``faulty_http.py``'s hold."""
    epochs, (sets, split, after) = 4, HELD[how]
    sets = tuple(s.format(eval_store=test_store) for s in sets)
    reference = tmp_path / "reference"
    train(pipeline(f"train.epochs={epochs}", *sets), tiny_store, reference)

    out, hold = tmp_path / "run", tmp_path / "hold"
    cache, held, faults = tiny_store, Path(f"{hold}.held"), None
    if how == "a-store-read":
        root, base = request.getfixturevalue("faulty_http_root")
        name = f"{request.node.callspec.id}.zarr"  # the server counts each object's requests
        shutil.copytree(tiny_store, root / name)
        cache, held, faults = f"{base}/{name}", root / ".held", root / ".faults"
        held.unlink(missing_ok=True)
        faults.write_text(json.dumps({f"{name}/targets/logits/c/2/0": "hold:1"}))
    args = [str(TINY_TOML), "--cache", cache, "--out", str(out), "--epochs", str(epochs), "--no-progress",
            "--set", 'data.factory="numbered.py:tiny_slow"', *(x for s in sets for x in ("--set", s))]
    hold.touch()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KDCACHE_TEST_HOLD": str(hold), "KDCACHE_TEST_HOLD_AFTER": str(after),
           "KDCACHE_TEST_HOLD_SPLIT": split}
    proc = subprocess.Popen([sys.executable, "-m", "kdcache.cli", "train", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240  # a loaded box took more than 120 s to start a run and train its first epoch
        while not held.exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the read was not held within 240 s"
            time.sleep(0.01)
        time.sleep(1)  # the batches made before the held one are trained: the run waits for it
        began = time.monotonic()
        stderr = signal_and_wait(proc, sig, timeout=30)  # a scheduler's grace before its SIGKILL
        took = time.monotonic() - began
    finally:
        hold.unlink()
        if faults is not None:
            faults.unlink()  # the server answers again
    at = r"in epoch 2 after batch \d+ \(step \d+"  # the step before the held batch
    if how == "a-store-read":
        at = r"in epoch 1 after batch 3 \(step 10"
    elif split == "test":  # an evaluation's: the epoch's last
        at = r"in epoch 2 after batch 7 \(step 21"
    if sig == signal.SIGTERM:
        assert proc.returncode == 143, stderr
        assert re.fullmatch(rf"Error: stopped by SIGTERM {at} of 28\); its checkpoint is saved in "
                            f"{re.escape(repr(str(out)))}: run the same command with --resume to continue", stderr.strip()), stderr
    else:
        assert proc.returncode == 130, stderr
        assert stderr.strip() == "Error: interrupted; its last checkpoint is kept: run it again with --resume to continue"
        assert [m["epoch"] for m in metrics(out)] == ([0] if how == "a-store-read" else [0, 1])
    assert took < 20, f"{took:.1f} s to stop"

    result = CliRunner().invoke(cli.main, ["train", *args, "--resume"])
    assert result.exit_code == 0, result.output
    same_run(out, reference)
    assert [m.get("eval_accuracy") for m in metrics(out)] == [m.get("eval_accuracy") for m in metrics(reference)]
    assert [m.get("eval_agreement") for m in metrics(out)] == [m.get("eval_agreement") for m in metrics(reference)]


LATE_SIGTERM = """
import atexit, importlib, os, runpy, signal, time
trainer = importlib.import_module("kdcache.train")  # the module (kdcache.train is the function)
if os.environ.get("SIGTERM_AT_STEP"):  # a first SIGTERM as that step begins
    losses, steps = trainer.Run.losses, iter(range(1, 10**9))
    def step(self, batch):
        if next(steps) == int(os.environ["SIGTERM_AT_STEP"]):
            os.kill(os.getpid(), signal.SIGTERM)
        return losses(self, batch)
    trainer.Run.losses = step
# as the interpreter exits; a handler runs as os.kill returns (the default one ends the process there), the sleep only
# keeps the interpreter from ending before it
atexit.register(lambda: (os.kill(os.getpid(), signal.SIGTERM), time.sleep(0.1)))
runpy.run_module("kdcache.cli", run_name="__main__")
"""


@pytest.mark.parametrize(("case", "code"), [("finished", 0), ("refused", 1), ("stopped", 143)])
def test_a_sigterm_once_the_command_has_ended_leaves_its_exit_status(tiny_store, tmp_path, case, code):
    """A SIGTERM that comes once `kdcache train` has ended (its weights written and said, its Error line given, or a
    first SIGTERM's checkpoint saved: a scheduler may send several) while the process exits: the exit status is the
    command's, 0, 1 or 143, not -15 (the kdcache program put Python's default back and was ended by the signal)."""
    out = tmp_path / "run"
    args = ["train", str(TINY_TOML), "--cache", tiny_store, "--out", str(out), "--epochs", "2", "--no-progress",
            *(a for s in PLAIN for a in ("--set", s)), *(["--resume"] if case == "refused" else [])]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **({"SIGTERM_AT_STEP": "3"} if case == "stopped" else {})}
    proc = subprocess.run([sys.executable, "-c", LATE_SIGTERM, *args], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == code, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error: ")]
    assert errors == [] if case == "finished" else len(errors) == 1, proc.stderr
    assert (out / "student.pt").exists() == (case == "finished")
    if case == "stopped":
        assert errors[0].startswith("Error: stopped by SIGTERM in epoch 0 after batch 3 (step 3 of 14)"), errors


def test_a_loss_gone_nan_inside_an_epoch_stops_before_the_next_checkpoint(tiny_store, tmp_path, monkeypatch):
    """train.checkpoint_every = 2: step 5's loss is NaN; the checkpoint due at step 6 is not written over the one of
    step 4, and the error says which one the folder keeps."""
    calls, losses_of = iter(range(1, 10**9)), Run.losses

    def nan_at_5(self, batch):
        parts = losses_of(self, batch)
        return {k: v * float("nan") for k, v in parts.items()} if next(calls) == 5 else parts

    monkeypatch.setattr(Run, "losses", nan_at_5)
    with pytest.raises(TrainingError, match=re.escape("training diverged in epoch 0: loss_kl = nan") + ".*" +
                       re.escape(f"({str(tmp_path / 'run' / CHECKPOINT)!r} keeps the run in epoch 0 after batch 4)")):
        train(pipeline(*PLAIN, "train.epochs=2", "train.checkpoint_every=2"), tiny_store, tmp_path / "run")
    ckpt = torch.load(tmp_path / "run" / CHECKPOINT, weights_only=True)
    assert (ckpt["step"], ckpt["batch"]) == (4, 4) and all(torch.isfinite(v).all() for v in ckpt["student"].values())


def test_a_plan_ending_inside_an_epoch_is_resumed_there_by_a_longer_one(tiny_store, tmp_path):
    """train.steps = 10 ends in epoch 1 after its batch 3: a --resume with train.steps = 17 trains that epoch's 4 batches
    left, then 3 of epoch 2, not 7 of epoch 2 (the rest of epoch 1 skipped). With a constant schedule (its lr does not
    depend on the plan's length) the result is the uninterrupted 17-step run's, per-epoch losses included."""
    p = functools.partial(pipeline, "student.factory='bad_input.py:dropping'", *PLAIN, "train.schedule='constant'")
    train(p("train.steps=17"), tiny_store, tmp_path / "whole")
    train(p("train.steps=10"), tiny_store, tmp_path / "cut")
    ckpt = torch.load(tmp_path / "cut" / CHECKPOINT, weights_only=True)
    assert (ckpt["epoch"], ckpt["batch"], ckpt["step"]) == (1, 3, 10)
    assert [m["step"] for m in metrics(tmp_path / "cut")] == [7, 10]  # the plan's last epoch, cut short, has its line
    train(p("train.steps=17"), tiny_store, tmp_path / "cut", resume=True)
    same_run(tmp_path / "cut", tmp_path / "whole")


@pytest.mark.parametrize("cut", ["inside-an-epoch", "at-an-epoch-s-end"])
def test_a_resume_with_no_step_left_ends_with_the_uninterrupted_run_s_last_line(tiny_store, tmp_path, monkeypatch, cut):
    """A --resume whose plan (train.steps/epochs) ends where the checkpoint was saved trains no step: it wrote the weights
    but no line for the epoch it stopped inside, and no evaluation where its line was saved with none due (train.eval_every
    = 0 evaluates at a plan's end only): the run's last metrics lacked eval_accuracy. Its lines are now the uninterrupted
    run's (a constant schedule: the same steps whatever the plan's length), timings aside."""
    p = functools.partial(pipeline, "student.factory='bad_input.py:dropping'", "train.features={}", "train.schedule='constant'",
                          "train.eval_every=0")
    if cut == "inside-an-epoch":  # SIGTERM as step 10 of 21 begins: saved in epoch 1 after its batch 3, no line of its own
        sigterm_at_step(monkeypatch, 10)
        with pytest.raises(kdcache.errors.TrainingStopped):
            train(p("train.epochs=3"), tiny_store, tmp_path / "cut")
        monkeypatch.undo()
        plan = p("train.steps=10")
    else:  # after epoch 0 of 3: its line has no evaluation (not due)
        train_cut_after_first_epoch(p("train.epochs=3"), tiny_store, tmp_path / "cut")
        plan = p("train.epochs=1")
    assert "eval_accuracy" not in metrics(tmp_path / "cut")[-1]
    train(plan, tiny_store, tmp_path / "whole")
    result = train(plan, tiny_store, tmp_path / "cut", resume=True)
    timing = ("seconds", "eval_seconds")
    got, want = ([{k: v for k, v in m.items() if k not in timing} for m in metrics(tmp_path / run)] for run in ("cut", "whole"))
    assert got == want and "eval_accuracy" in got[-1]
    assert [list(m) for m in metrics(tmp_path / "cut")] == [list(m) for m in metrics(tmp_path / "whole")]
    assert {k: v for k, v in result.items() if k in got[-1]} == got[-1]
    same_run(tmp_path / "cut", tmp_path / "whole")
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text()
    train(plan, tiny_store, tmp_path / "cut", resume=True)  # complete now: nothing is evaluated or written again
    assert (tmp_path / "cut" / "metrics.jsonl").read_text() == lines


@pytest.mark.parametrize("student", ["dropping", "sampled_in_eval"])
def test_what_a_run_reports_does_not_change_what_it_trains(tiny_store, tmp_path, student):
    """train.eval_every (and eval_split) may change on --resume: evaluating must not move the RNG dropout draws
    from, or a run resumed with another eval_every reaches other weights than the uninterrupted one: neither its
    DataLoader's seed nor a student that samples in evaluation too (Monte Carlo dropout)."""
    p = functools.partial(pipeline, f"student.factory='bad_input.py:{student}'", "train.features={}", "train.epochs=3")
    train(p("train.eval_every=1"), tiny_store, tmp_path / "whole")
    train_cut_after_first_epoch(p("train.eval_every=1"), tiny_store, tmp_path / "cut")
    train(p("train.eval_every=0"), tiny_store, tmp_path / "cut", resume=True)
    a, b = (torch.load(run / "student.pt", weights_only=True) for run in (tmp_path / "cut", tmp_path / "whole"))
    assert all(torch.equal(a[k], b[k]) for k in b)
    assert [m["loss"] for m in metrics(tmp_path / "cut")] == [m["loss"] for m in metrics(tmp_path / "whole")]


def test_sigterm_to_an_overwrite_run_names_a_command_that_resumes_it(tiny_store, tmp_path, monkeypatch):
    """--resume and --overwrite together are refused: a run started with --overwrite and stopped by SIGTERM must not
    be told to run "the same command with --resume"."""
    out = tmp_path / "run"
    args = ["train", str(TINY_TOML), "--cache", tiny_store, "--out", str(out), "--no-progress", *(a for s in PLAIN for a in ("--set", s))]

    def stopped(*extra: str) -> str:
        result = CliRunner().invoke(cli.main, [*args, *extra])
        assert result.exit_code == 143, result.output
        [line] = [line for line in result.output.splitlines() if line.startswith("Error:")]
        return line.split(f"is saved in {str(out)!r}: ")[1]

    assert CliRunner().invoke(cli.main, [*args, "--set", "train.epochs=1"]).exit_code == 0
    sigterm_at_step(monkeypatch, 3)
    assert stopped("--overwrite") == "run it again with --resume instead of --overwrite to continue"
    monkeypatch.undo()
    sigterm_at_step(monkeypatch, 2)
    assert stopped("--resume") == "run the same command again to continue"


def test_the_progress_line_counts_a_joined_steps_rows(tiny_store, tmp_path, capsys):
    """train.streams = 2 in one process: a step joins two batches. The line's total counts them (else it reads
    "50/32" and, past its total, is drawn at every step: the loss read from the device each step)."""
    train(pipeline(*PLAIN, "train.epochs=1", "train.streams=2", "train.memory_budget_mb=0", "train.shuffle_buffer_shards=1"),
          tiny_store, tmp_path / "run", progress=True)
    drawn = [tuple(map(int, m)) for m in re.findall(r"epoch 0 (\d+)/(\d+)", capsys.readouterr().err)]
    assert drawn and all(done <= total for done, total in drawn), drawn


def test_a_checkpoint_of_kdcache_0_1_3_resumes_to_the_uninterrupted_run(tiny_store, tmp_path):
    """kdcache 0.1.3 saved checkpoints at epochs' ends only, with no ``batch`` or ``partial`` key and ``rng`` a tensor."""
    p = pipeline("student.factory='bad_input.py:dropping'", *PLAIN, "train.epochs=3")
    train(p, tiny_store, tmp_path / "whole")
    train_cut_after_first_epoch(p, tiny_store, tmp_path / "cut")
    ckpt = torch.load(tmp_path / "cut" / CHECKPOINT, weights_only=True)
    assert ckpt.pop("batch") == 0 and "partial" not in ckpt and isinstance(ckpt["rng"], torch.Tensor)
    torch.save(ckpt, tmp_path / "cut" / CHECKPOINT)
    train(p, tiny_store, tmp_path / "cut", resume=True)
    same_run(tmp_path / "cut", tmp_path / "whole")


@pytest.mark.parametrize("kdcache_0_1_12", [False, True])
def test_a_resume_that_remakes_its_last_line_records_the_rate_of_the_last_step(tiny_store, tmp_path, kdcache_0_1_12):
    """A plan ending inside an epoch (train.steps = 10 of a cosine schedule) resumed with no step left, its last line
    lost, makes that line again from the checkpoint's loss sums: its ``lr`` is the rate step 10 took, the checkpoint's,
    or (kdcache <= 0.1.12 recorded none) the schedule's for that step, the same value where the plan did not change."""
    p = pipeline(*PLAIN, "train.steps=10")
    out = tmp_path / "run"
    train(p, tiny_store, out)
    whole = metrics(out)
    assert whole[-1]["step"] == 10 and whole[-1]["lr"] > 0
    (out / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in whole[:-1]))
    if kdcache_0_1_12:
        ckpt = torch.load(out / CHECKPOINT, weights_only=True)
        del ckpt["lr"]
        torch.save(ckpt, out / CHECKPOINT)
    train(p, tiny_store, out, resume=True)
    again = metrics(out)
    assert [(m["epoch"], m["step"]) for m in again] == [(m["epoch"], m["step"]) for m in whole]
    assert again[-1]["lr"] == pytest.approx(whole[-1]["lr"], rel=1e-12) and again[-1]["loss"] == pytest.approx(whole[-1]["loss"])


@pytest.mark.parametrize("last", ["json-without-newline", "cut-short"])
def test_a_resume_keeps_a_whole_last_metrics_line_without_its_newline_and_drops_one_cut_short(tiny_store, tmp_path, last):
    """A run killed as it appended its epoch's line leaves metrics.jsonl ending inside a line: the whole line but its
    newline (valid JSON: kept, as the checkpoint after it may have been saved), or part of it (dropped). --resume writes
    the file whole again: each line its own, ending in a newline, the epochs in order."""
    p = pipeline(*PLAIN, "train.epochs=1")
    out = tmp_path / "run"
    train(p, tiny_store, out)
    text = (out / "metrics.jsonl").read_text()
    assert text.endswith("\n") and len(text.splitlines()) == 1
    (out / "metrics.jsonl").write_text(text[:-1] if last == "json-without-newline" else text + '{"epoch": 1, "st')
    train(pipeline(*PLAIN, "train.epochs=2"), tiny_store, out, resume=True)
    assert [m["epoch"] for m in metrics(out)] == [0, 1]
    assert (out / "metrics.jsonl").read_text().startswith(text) and (out / "metrics.jsonl").read_text().endswith("}\n")


def test_metrics_seconds_count_the_run_s_training_time_across_a_resume(tiny_store, tmp_path):
    """``seconds`` in metrics.jsonl counted from the start of the process: after a --resume it began again from zero, so a
    plot of loss against time folded back. It is the run's training time: the checkpoint records it, and a checkpoint
    of kdcache <= 0.1.8, without it, counts on from the last metrics line the resumed run keeps."""
    p = pipeline(*PLAIN, "train.epochs=3")
    for old in (False, True):
        out = tmp_path / f"run-{old}"
        train_cut_after_first_epoch(p, tiny_store, out)
        ckpt = torch.load(out / CHECKPOINT, weights_only=True)
        assert ckpt["seconds"] >= metrics(out)[0]["seconds"] > 0
        if old:
            del ckpt["seconds"]
            (out / "metrics.jsonl").write_text(json.dumps({**metrics(out)[0], "seconds": 500.0}) + "\n")
        else:
            ckpt["seconds"] = 1000.0  # well past what this process takes
        torch.save(ckpt, out / CHECKPOINT)
        result = train(p, tiny_store, out, resume=True)
        seconds = [m["seconds"] for m in metrics(out)]
        earlier = 500.0 if old else 1000.0
        assert earlier < seconds[1] < seconds[2] <= result["seconds"] < earlier + 600, seconds


def test_metrics_seconds_leave_out_evaluation_which_eval_seconds_counts(tiny_store, tmp_path, monkeypatch):
    """``seconds`` is the run's training time (README): it counted each evaluation too, so a run evaluated every epoch on
    a large eval split read as slow to train. Each evaluation's time is its line's ``eval_seconds``."""
    trainer = importlib.import_module("kdcache.train")  # the module (kdcache.train is the function)
    evaluator, pause = trainer._evaluator, 1.5

    def slow(*args, **kwargs):
        evaluate = evaluator(*args, **kwargs)

        def slowly():
            time.sleep(pause)
            return evaluate()
        return slowly

    monkeypatch.setattr(trainer, "_evaluator", slow)
    started = time.perf_counter()
    result = train(pipeline("train.features={}", "train.epochs=2"), tiny_store, tmp_path / "run")
    wall = time.perf_counter() - started
    lines = metrics(tmp_path / "run")
    assert [list(m)[-2:] for m in lines] == [["eval_seconds", "seconds"]] * 2 and all(m["eval_seconds"] >= pause for m in lines)
    assert 0 < lines[0]["seconds"] < lines[1]["seconds"] <= result["seconds"] <= wall - 2 * pause, (lines, wall)
    assert torch.load(tmp_path / "run" / CHECKPOINT, weights_only=True)["seconds"] <= wall - 2 * pause
    plain = train(pipeline(*PLAIN, "train.epochs=1"), tiny_store, tmp_path / "plain")  # no evaluation: no eval_seconds
    assert "eval_seconds" not in plain and "eval_seconds" not in metrics(tmp_path / "plain")[0]


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_weight_decay_pulls_matrices_and_kernels_toward_zero_but_not_biases_or_norm_weights(name):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.LazyLinear(5),
                                torch.nn.LayerNorm(5))
    model(torch.zeros(2, 3, 5, 5))
    params = list(model.parameters())
    optimizer = importlib.import_module("kdcache.train")._optimizer(name, params, 0.1, 0.5)
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert len(decay) == len(params) == 8
    assert [decay[id(p)] for p in params] == [0.5 if p.ndim >= 2 else 0.0 for p in params]
    assert [p.ndim for p in params] == [4, 1, 1, 1, 2, 1, 1, 1]


def test_a_checkpoint_of_kdcache_0_1_8_keeps_decaying_every_parameter_on_resume(tiny_store, tmp_path, monkeypatch, capsys):
    """kdcache <= 0.1.8 decayed biases too (one parameter group): its run resumes to the run it would have been."""
    p = pipeline(*PLAIN, "train.epochs=3", "train.weight_decay=0.5")
    trainer = importlib.import_module("kdcache.train")
    optimizer = trainer._optimizer
    with monkeypatch.context() as m:  # kdcache 0.1.8's optimizer
        m.setattr(trainer, "_optimizer", lambda name, params, lr, wd, decay_all=False: optimizer(name, params, lr, wd, True))
        train(p, tiny_store, tmp_path / "whole")
        train_cut_after_first_epoch(p, tiny_store, tmp_path / "cut")
    assert len(torch.load(tmp_path / "cut" / CHECKPOINT, weights_only=True)["optimizer"]["param_groups"]) == 1
    train(p, tiny_store, tmp_path / "new")
    capsys.readouterr()
    train(p, tiny_store, tmp_path / "cut", resume=True)
    assert "started by kdcache <= 0.1.8" in capsys.readouterr().err
    same_run(tmp_path / "cut", tmp_path / "whole")
    new = torch.load(tmp_path / "new" / "student.pt", weights_only=True)
    whole = torch.load(tmp_path / "whole" / "student.pt", weights_only=True)
    assert not all(torch.equal(new[k], whole[k]) for k in whole)  # the rule changed what a new run learns


def test_auto_resume_starts_a_run_and_continues_it_with_the_same_command(tiny_store, tmp_path, monkeypatch, capsys):
    """A job a scheduler requeues runs one command each time: --auto-resume starts the run where OUT has no checkpoint
    and continues it where it has one (a SIGTERM's, inside an epoch), reaching the uninterrupted run's weights."""
    out = tmp_path / "run"
    args = ["train", str(TINY_TOML), "--cache", tiny_store, "--out", str(out), "--no-progress", "--epochs", "3",
            *(a for s in PLAIN for a in ("--set", s))]
    assert CliRunner().invoke(cli.main, [*args[:5], str(tmp_path / "whole"), *args[6:]]).exit_code == 0
    sigterm_at_step(monkeypatch, 10)
    first = CliRunner().invoke(cli.main, [*args, "--auto-resume"])
    assert first.exit_code == 143, first.output
    assert first.output.strip().endswith(f"its checkpoint is saved in {str(out)!r}: run the same command again to continue"), first.output
    monkeypatch.undo()
    again = CliRunner().invoke(cli.main, [*args, "--auto-resume"])
    assert again.exit_code == 0, again.output
    assert f"resuming {str(out)!r} in epoch 1 after batch 3 (step 10 of 21)" in again.output
    same_run(out, tmp_path / "whole")
    for refused in (["--auto-resume", "--overwrite"], ["--resume", "--auto-resume"]):
        result = CliRunner().invoke(cli.main, [*args, *refused])
        assert result.exit_code == 2 and f"{' and '.join(refused)} were given" in result.output, result.output
    with pytest.raises(TypeError, match=r'^resume must be True, False or "auto", got str \'yes\'$'):
        train(pipeline(*PLAIN), tiny_store, tmp_path / "other", resume="yes")


def test_auto_resume_of_a_finished_run_says_so_and_writes_nothing_unless_more_epochs_are_asked_for(tiny_store, tmp_path):
    """A requeued job whose run had finished: --auto-resume resumed it, trained no step and wrote student.pt and heads.pt
    again; it says in one line that the run is finished, names the student and writes nothing (exit 0). More epochs
    train on as before; a run stopped before its student was written (its last checkpoint saved) writes it."""
    out = tmp_path / "run"
    args = ["train", str(TINY_TOML), "--cache", tiny_store, "--out", str(out), "--no-progress", "--auto-resume",
            *(a for s in PLAIN for a in ("--set", s))]
    assert CliRunner().invoke(cli.main, [*args, "--epochs", "2"]).exit_code == 0
    files = {f.name: (f.stat().st_mtime_ns, f.read_bytes()) for f in out.iterdir()}
    again = CliRunner().invoke(cli.main, [*args, "--epochs", "2"])
    assert again.exit_code == 0 and again.output == (
        f"{str(out)!r} already finished its run (train.epochs = 2, step 14); its student is {str(out / 'student.pt')!r}: nothing "
        "was trained or written (raise train.epochs to train on, or --overwrite to start afresh)\n"), again.output
    assert {f.name: (f.stat().st_mtime_ns, f.read_bytes()) for f in out.iterdir()} == files
    longer = CliRunner().invoke(cli.main, [*args, "--epochs", "3"])
    assert longer.exit_code == 0 and f"resuming {str(out)!r} after epoch 1 (step 14 of 21)" in longer.output, longer.output
    assert [m["epoch"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())] == [0, 1, 2]
    (out / "heads.pt").unlink()  # stopped after its last checkpoint, before its weights were all written
    ended = CliRunner().invoke(cli.main, [*args, "--epochs", "3"])
    assert ended.exit_code == 0 and "resuming" in ended.output and (out / "heads.pt").is_file(), ended.output


@pytest.mark.parametrize("flag", ["--resume", "--auto-resume"])
def test_a_resume_of_a_finished_run_says_so_and_writes_nothing_unless_its_last_line_is_to_be_made(tiny_store, tmp_path, flag):
    """--resume of a finished run (the plan it was trained under, still asked for, ended; its student.pt and heads.pt
    written) trained no step, wrote student.pt and heads.pt again (same bytes, new mtimes) and said "student written",
    where --auto-resume said the run was finished and wrote nothing: both say so now. A run whose last metrics line
    was lost (a plan that ended inside an epoch, train.steps, makes it again from the checkpoint's loss sums) is not
    finished: either flag makes that line again, and then says the run is finished."""
    out = tmp_path / "run"
    args = ["train", str(TINY_TOML), "--cache", tiny_store, "--out", str(out), "--no-progress",
            *(a for s in [*PLAIN, "train.steps=10"] for a in ("--set", s))]
    assert CliRunner().invoke(cli.main, args).exit_code == 0
    whole = (out / "metrics.jsonl").read_text()
    files = {f.name: (f.stat().st_mtime_ns, f.read_bytes()) for f in out.iterdir()}
    said = (f"{str(out)!r} already finished its run (train.steps = 10, step 10); its student is {str(out / 'student.pt')!r}: "
            "nothing was trained or written (raise train.steps to train on, or --overwrite to start afresh)\n")
    again = CliRunner().invoke(cli.main, [*args, flag])
    assert again.exit_code == 0 and again.output == said, again.output
    assert {f.name: (f.stat().st_mtime_ns, f.read_bytes()) for f in out.iterdir()} == files
    (out / "metrics.jsonl").write_text(whole.splitlines(keepends=True)[0])  # epoch 1's line lost
    remade = CliRunner().invoke(cli.main, [*args, flag])
    assert remade.exit_code == 0 and f"resuming {str(out)!r} in epoch 1 after batch 3 (step 10 of 10)" in remade.output, remade.output
    assert [m["epoch"] for m in metrics(out)] == [0, 1] and metrics(out)[1]["loss"] == json.loads(whole.splitlines()[1])["loss"]
    assert CliRunner().invoke(cli.main, [*args, flag]).output == said


def test_auto_resume_of_a_finished_run_returns_what_the_run_returned(tiny_store, tmp_path, capsys):
    """``train(resume="auto")`` on a finished run returns the run's last metrics, its student's parameter count (from the
    checkpoint: the student is not built) and ``already_finished`` (was: no ``params``: a requeued script reading it
    failed on its second run); a checkpoint of kdcache 0.1.15, which does not record the count, still returns the rest."""
    out = tmp_path / "run"
    first = train(pipeline(*PLAIN, "train.epochs=2"), tiny_store, out, resume="auto")
    again = train(pipeline(*PLAIN, "train.epochs=2"), tiny_store, out, resume="auto")
    assert "already finished its run" in capsys.readouterr().out
    assert {k: v for k, v in again.items() if k != "seconds"} == {**{k: v for k, v in first.items() if k != "seconds"}, "already_finished": True}
    assert again["params"] == first["params"] > 0 and 0 < again["seconds"] <= first["seconds"]  # the last checkpoint's
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=False)
    del checkpoint["params"]  # as 0.1.15 saved it
    torch.save(checkpoint, out / "checkpoint.pt")
    older = train(pipeline(*PLAIN, "train.epochs=2"), tiny_store, out, resume="auto")
    assert older["already_finished"] and "params" not in older and older["epoch"] == first["epoch"] == 1


def test_resume_of_a_finished_run_whose_eval_split_has_no_labels_writes_nothing(tmp_path, capsys):
    """An eval split without labels gives an evaluation no metric (no accuracy: never a 0 that reads as one); its line
    had no ``eval_seconds`` either, so a finished run's last line read as one whose evaluation was still due
    (``_line_due``): every --auto-resume (a requeued job) or --resume evaluated again and rewrote checkpoint.pt,
    metrics.jsonl, student.pt and heads.pt instead of saying the run had finished. A line whose evaluation ran has its
    ``eval_seconds``, metrics or not."""
    (tmp_path / "unlabeled.py").write_text(
        "import tiny\n\n\nclass Unlabeled:\n    def __init__(self, d):\n        self.d = d\n\n    def __len__(self):\n"
        "        return len(self.d)\n\n    def __getitem__(self, i):\n        return self.d[i][0]\n\n\n"
        "def dataset(split='train'):\n    return tiny.dataset(split) if split == 'train' else Unlabeled(tiny.dataset(split))\n")
    values = [f"data.factory={tmp_path / 'unlabeled.py'}:dataset", "train.features={}", "train.epochs=2"]
    store = str(tmp_path / "s.zarr")
    kdcache.extract(pipeline(*values), store)
    out = tmp_path / "run"
    first = train(pipeline(*values), store, out)
    assert "eval_accuracy" not in first and "eval_seconds" in metrics(out)[-1]  # the evaluation ran, and said so
    before = {f.name: (f.stat().st_mtime_ns, f.read_bytes()) for f in out.iterdir()}
    capsys.readouterr()
    for resume in ("auto", True):
        again = train(pipeline(*values), store, out, resume=resume)
        assert again["already_finished"] and "already finished its run" in capsys.readouterr().out, resume
    assert {f.name: (f.stat().st_mtime_ns, f.read_bytes()) for f in out.iterdir()} == before


def test_a_sigterm_while_a_stopped_run_cleans_up_is_ignored(tiny_store, tmp_path, monkeypatch):
    """A second SIGTERM after the run saved its checkpoint and stopped, while it stops its batches (a scheduler may
    send several), does not interrupt that clean-up: the command says the stop's own line, exit 143."""
    from kdcache import data as data_module

    out, stop_making = tmp_path / "run", data_module.stop_making

    def signalled_again(batches, *wait):
        os.kill(os.getpid(), signal.SIGTERM)
        return stop_making(batches, *wait)

    sigterm_at_step(monkeypatch, 3)
    monkeypatch.setattr(data_module, "stop_making", signalled_again)
    result = CliRunner().invoke(cli.main, ["train", str(TINY_TOML), "--cache", tiny_store, "--out", str(out), "--no-progress",
                                           *(a for s in PLAIN for a in ("--set", s))])
    assert result.exit_code == 143, result.output
    assert result.output.strip().splitlines()[-1] == (f"Error: stopped by SIGTERM in epoch 0 after batch 3 (step 3 of 14); its checkpoint "
                                                      f"is saved in {str(out)!r}: run the same command with --resume to continue")


def test_a_run_that_streamed_is_resumed_streaming_whatever_the_budget_says_now(tiny_store, tmp_path):
    """A run whose targets streamed (train.memory_budget_mb below them; or, up to kdcache 0.1.15, a subset whose store
    was larger than the budget: its RAM check counted every row of the store) resumes streaming, though the budget now
    holds them in RAM: its batches come in the order they began in, as the uninterrupted run's (was: refused, "served
    its batches streamed, now from RAM", naming a budget that did not stream them)."""
    streamed = ["train.memory_budget_mb=0", "train.schedule=\"constant\"", *PLAIN]  # constant: the longer plan keeps the rate
    whole = train(pipeline(*streamed, "train.epochs=2"), tiny_store, tmp_path / "whole")
    train(pipeline(*streamed, "train.epochs=1"), tiny_store, tmp_path / "run")
    again = train(pipeline(*streamed[1:], "train.epochs=2"), tiny_store, tmp_path / "run", resume=True)  # the budget holds them now
    assert again["loss"] == whole["loss"]
    a, b = (torch.load(run / "student.pt", weights_only=True) for run in (tmp_path / "run", tmp_path / "whole"))
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_the_streams_a_run_took_are_checked_only_where_its_checkpoint_records_them():
    """A checkpoint of kdcache <= 0.1.5 records no streams: resumed as before. One that does: the same streams resume it
    whether they are ranks or train.streams in one process; other streams, or another batch order, are refused."""
    from kdcache.pipeline import Pipeline
    from kdcache.train import _check_resumed_plan

    t, at = Pipeline().train, {"step": 3, "epoch": 0, "batch": 3}
    two_ranks = {"in_memory": True, "workers": "any", "streams": 2, "ranks": 2}
    _check_resumed_plan({**at, "order": {"in_memory": True, "workers": "any"}}, two_ranks, 10, t)  # kdcache <= 0.1.5
    _check_resumed_plan({**at, "order": two_ranks}, {**two_ranks, "ranks": 1}, 10, t)  # 2 streams in one process
    with pytest.raises(PipelineError, match=r"took a batch from each of 2 streams a step, now 1 \(one process\)"):
        _check_resumed_plan({**at, "order": two_ranks}, {**two_ranks, "streams": 1, "ranks": 1}, 10, t)
    with pytest.raises(PipelineError, match=r"served its batches from RAM, now streamed"):
        _check_resumed_plan({**at, "order": two_ranks}, {**two_ranks, "in_memory": False}, 10, t)


@pytest.mark.parametrize("source", ["eval_split", "eval_cache"])
def test_torchrun_ranks_each_evaluate_their_part_and_the_counts_are_summed(tiny_store, test_store, monkeypatch, source):
    """Under torchrun each rank evaluates a contiguous 1/world of the eval split (of the eval store's shards, for
    train.eval_cache) and the counts are summed over the ranks (``distributed.sum_over_ranks``: here, outside a process
    group, each rank's own): every rank evaluated the whole split before, K ranks taking the time of one process. A rank
    left without a part (more ranks than shards) counts nothing."""
    module = importlib.import_module("kdcache.train")
    p = pipeline("train.features={}", *([f'train.eval_cache="{test_store}"'] if source == "eval_cache" else []))
    store = layout.open_store(tiny_store)
    run = module.setup(p, store, tiny.dataset("train"), torch.device("cpu"))
    rows = len(tiny.dataset("test"))
    per_shard = layout.open_store(test_store).rows_per_shard
    shards = -(-rows // per_shard)

    getitems = data.getitems

    def evaluated(rank: int, world: int) -> tuple[dict[str, float], int]:
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(world))
        part = np.array_split(np.arange(shards if source == "eval_cache" else rows), world)[rank]
        if source == "eval_cache":
            part = np.concatenate([np.arange(s * per_shard, min(rows, s * per_shard + per_shard)) for s in part] or [part])
        evaluate, read = module._evaluator(p, run, torch.device("cpu"), trained=store.manifest), []
        with monkeypatch.context() as m:  # the eval items this rank reads
            m.setattr(data, "getitems", lambda dataset, indices, *args, **kw: (read.extend(indices), getitems(dataset, indices, *args, **kw))[1])
            metrics = evaluate()
        assert sorted(set(read)) == part.tolist(), (rank, world)
        return metrics, len(part)

    whole, n = evaluated(0, 1)
    assert n == rows and set(whole) == ({"eval_accuracy", "eval_agreement", "eval_teacher_accuracy"} if source == "eval_cache"
                                        else {"eval_accuracy"})
    parts = [evaluated(rank, 2) for rank in (0, 1)]
    assert all(0 < m < rows for _, m in parts) and sum(m for _, m in parts) == rows
    for key, value in whole.items():  # each part's counts add up to the whole's
        assert sum(metrics[key] * m for metrics, m in parts) == pytest.approx(value * rows), key
    if source == "eval_cache":
        assert evaluated(shards, shards + 1)[0] == {}  # a rank with no shard of its own: no rows, no metrics (0 of 0)


# ------------------------------------------------------------------------------------------ padding mask (train.mask)


def token_pipeline(teacher: str = "token_lm", dataset: str = "padded_tokens", select: str = "auto", **train_values) -> kdcache.Pipeline:
    """A per-token LM (extract_zoo.TokenLM) over dict items {tokens, attention_mask}: kl and mse on its (6, 12) logits per
    sample and feature MSE on its (6, 16) hidden states, through a per-token projection head from the student's (6, 8).
    ``select``: the part of both outputs stored and compared, on teacher and student alike (e.g. "1:", 5 tokens)."""
    from kdcache.pipeline import from_dict

    values = {"epochs": 2, "batch_size": 8, "lr": 0.01, "device": "cpu", "loss": {"kl": 1.0, "mse": 0.5},
              "features": {"hidden": {"student": "hidden", "weight": 0.1, "select": select}}, **train_values}
    targets = {"layers": ["hidden"], "dtype": "float32", **({"select": {"logits": select, "hidden": select}} if select != "auto" else {})}
    return from_dict({"teacher": {"factory": f"extract_zoo.py:{teacher}"}, "data": {"factory": f"extract_zoo.py:{dataset}"},
                      "targets": targets, "extract": {"batch_size": 10, "device": "cpu", "rows_per_shard": 10},
                      "student": {"factory": "extract_zoo.py:token_lm_student", "select": select}, "train": values}, root=FIXTURES)


@pytest.fixture(scope="module")
def token_stores(tmp_path_factory) -> dict[str, str]:
    """Stores of extract_zoo.TokenLM over 50 items: padded (the last i % 3 tokens of item i), as the teacher computes them
    ("padded") and with its stored logits and hidden states 1e4 at every pad position ("wild"); over unpadded items; and
    over items with wrong masks beside theirs ("odd")."""
    folder, stores = tmp_path_factory.mktemp("token-stores"), {}
    for name, teacher, dataset in (("padded", "token_lm", "padded_tokens"), ("wild", "token_lm_wild_pad", "padded_tokens"),
                                   ("unpadded", "token_lm", "unpadded_tokens"), ("odd", "token_lm", "odd_masks")):
        stores[name] = str(folder / f"{name}.zarr")
        kdcache.extract(token_pipeline(teacher, dataset), stores[name])
    return stores


def trained(out: Path) -> dict[str, torch.Tensor]:
    return {**torch.load(out / "student.pt"), **{f"head.{k}": v for k, v in torch.load(out / "heads.pt").items()}}


@pytest.mark.parametrize("mse_on", ["logits", "probabilities"])
def test_a_padding_mask_leaves_what_the_teacher_stored_at_padding_out_of_the_losses_and_the_weights(token_stores, tmp_path, mse_on):
    """Without train.mask, every position counted: the student was trained to give the teacher's outputs at padding (here
    1e4); with it, the stored pad positions change neither a loss term nor a trained weight (the mask read with each
    batch's own items: another batch's would let the 1e4 in)."""
    runs = {}
    for store in ("padded", "wild"):
        for mask in ("attention_mask", ""):
            out = tmp_path / f"{store}-{mask or 'none'}"
            train(token_pipeline(mask=mask, loss={"kl": 1.0, "mse": 0.5, "mse_on": mse_on}), token_stores[store], out)
            runs[store, mask] = metrics(out), trained(out)
    masked, wild = runs["padded", "attention_mask"], runs["wild", "attention_mask"]
    assert [{k: v for k, v in m.items() if k.startswith("loss")} for m in masked[0]] == [
        {k: v for k, v in m.items() if k.startswith("loss")} for m in wild[0]]
    assert {"loss_kl", "loss_mse", "loss_feat:hidden"} <= set(masked[0][-1])
    assert all(torch.equal(masked[1][k], wild[1][k]) for k in masked[1])
    unmasked, wild_unmasked = runs["padded", ""], runs["wild", ""]
    assert wild_unmasked[0][-1]["loss_feat:hidden"] > 1e3 * unmasked[0][-1]["loss_feat:hidden"]
    assert not all(torch.equal(unmasked[1][k], wild_unmasked[1][k]) for k in unmasked[1])


@pytest.mark.parametrize("mse_on", ["logits", "probabilities"])
def test_masked_per_token_terms_are_each_row_s_mean_over_its_valid_tokens_then_the_mean_over_rows(token_stores, tmp_path, graded, mse_on):
    """train.mask on per-token logits (6, 12) and features (6, 16) through a per-token linear head: each step's kl, mse and
    feature MSE, and their gradient, are the mean over rows of each row's mean over its valid tokens (README: per sample,
    not per token: a row of 4 valid tokens weighs as one of 6), computed token by token in float64 from the live teacher,
    whose values at padding the store ("wild") holds as 1e4 instead."""
    from extract_zoo import padded_tokens, token_lm, token_lm_student

    train(token_pipeline(mask="attention_mask", epochs=1, loss={"kl": 1.0, "temperature": 2.0, "mse": 0.5, "mse_on": mse_on}),
          token_stores["wild"], tmp_path / "run")
    teacher, student, hooked = token_lm().eval(), token_lm_student().double(), {}
    teacher.hidden.register_forward_hook(lambda m, i, o: hooked.update(teacher=o))
    student.hidden.register_forward_hook(lambda m, i, o: hooked.update(student=o))
    items, index = padded_tokens(), layout.open_store(token_stores["wild"]).array(layout.INDEX)[:]
    T = 2.0
    for step in graded:
        batch = default_collate([items[int(i)] for i in index[step["batch"]["rows"].numpy()]])
        with torch.no_grad():
            t = teacher(**batch).double()
        w = {k: v.double().requires_grad_() for k, v in step["params"].items()}
        s = torch.func.functional_call(student, {k: v for k, v in w.items() if not k.startswith("heads:")}, kwargs=batch)
        head = F.linear(hooked["student"], w["heads:targets/layers/hidden.linear.weight"], w["heads:targets/layers/hidden.linear.bias"])
        p_t, p_s, mask = F.softmax(t / T, -1), F.softmax(s / T, -1), batch["attention_mask"]
        mse = (s - t).square().mean(-1) if mse_on == "logits" else (p_s - p_t).square().sum(-1)
        reference = {"kl": row_means(T * T * (p_t * (p_t.log() - p_s.log())).sum(-1), mask), "mse": 0.5 * row_means(mse, mask),
                     "feat:hidden": 0.1 * row_means((head - hooked["teacher"].double()).square().mean(-1), mask)}
        same_as_reference(step, reference, w)
    assert any(not m.all() for s in graded for m in s["batch"]["inputs"]["attention_mask"])  # the premise: padded rows


def test_a_mask_of_items_without_padding_trains_as_no_mask(token_stores, tmp_path):
    """Equal up to rounding (the masked mean sums each row first): SGD, as AdamW would make steps of lr out of the rounding of
    a gradient that is 0 (attention's key bias, to which softmax is blind)."""
    for mask in ("attention_mask", ""):
        train(token_pipeline(dataset="unpadded_tokens", mask=mask, optimizer="sgd", lr=0.05), token_stores["unpadded"],
              tmp_path / (mask or "none"))
    with_mask, without = trained(tmp_path / "attention_mask"), trained(tmp_path / "none")
    for key, value in without.items():
        torch.testing.assert_close(with_mask[key], value)
    for a, b in zip(metrics(tmp_path / "attention_mask"), metrics(tmp_path / "none")):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


@pytest.mark.parametrize(("mask", "error", "match"), [
    ("mask", PipelineError, r"train.mask = 'mask' is not an entry of the dataset's inputs \(their keys: \['tokens', 'attention_mask', "
                            r"'long_mask', 'length', 'weights', 'key_padding_mask', 'stored_mask'\]\); name the entry"),
    ("long_mask", ShapeMismatchError, r"train.mask 'long_mask' has 7 positions per item, but the stored 'logits' has 6 tokens "
                                      r"\(per-sample shape \[6, 12\]\)"),
    ("length", ShapeMismatchError, r"train.mask 'length' must be one \(tokens,\) tensor per item, got int64\[2\] for a batch of 2 items"),
    ("weights", PipelineError, r"train.mask 'weights' must hold bool or 0/1 values \(true where a position counts\), got 0.5 \(float32\)"),
    # true at padding: item 0 has none, so its mask keeps no position (the run's loss would be 0 on every unpadded item)
    ("key_padding_mask", PipelineError, r"train.mask 'key_padding_mask' keeps no position of item 0 \(its 6 values all false\); it must "
                                        r"be true where a position counts, as a Hugging Face attention_mask is: .* return ~mask"),
])
def test_a_train_mask_that_is_not_the_items_padding_mask_is_refused_before_training(token_stores, tmp_path, mask, error, match):
    with pytest.raises(error, match=match):
        train(token_pipeline(dataset="odd_masks", mask=mask), token_stores["odd"], tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_train_mask_of_other_values_than_0_and_1_in_a_later_batch_is_refused(tmp_path):
    """train.mask's values were checked on the first two items only, and the losses made any other batch's mask bool: a
    count of 2 in item 30 counted as true, with no word. Each batch's is checked on the host (the losses are passed it as
    bool, made so on the device: no device sync each step), and such a batch is refused in one line naming the value."""
    p = token_pipeline(dataset="counted_masks", mask="counts", epochs=1)
    store = str(tmp_path / "counted.zarr")
    kdcache.extract(p, store)
    with pytest.raises(PipelineError, match=r"train.mask 'counts' must hold bool or 0/1 values \(true where a position counts\), got 2 "
                                            r"\(int64\); return mask != 0"):
        train(p, store, tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_train_mask_s_values_are_checked_as_each_batch_is_made_and_a_bad_one_never_reaches_the_step(tmp_path, monkeypatch):
    """Each batch's train.mask values were checked by the thread running the steps (a float mask's every value compared:
    0.4 ms a batch at 256 x 2048, each step). They are checked where the batch is made, by the thread making batches ahead
    (kdcache-prefetch), and the step takes the mask as bool; a count of 2 in item 30 still ends the run at its batch, in
    one line, now before that batch reaches the step: the batches before it trained, checkpoint_every's checkpoint holds
    them, and a --resume is refused at the same batch, its checkpoint kept."""
    from extract_zoo import counted_masks

    p = token_pipeline(dataset="counted_masks", mask="counts", epochs=1, checkpoint_every=1, seed=2)  # item 30 in batch 5
    store, out = str(tmp_path / "counted.zarr"), tmp_path / "run"
    kdcache.extract(p, store)
    checked, stepped = [], []
    check, losses_of = data.check_mask_values, Run.losses

    def checking(mask, *args):
        checked.append((threading.current_thread().name, len(mask)))
        return check(mask, *args)

    def stepping(self, batch):
        stepped.append((batch["rows"].tolist(), batch.get("mask", batch["inputs"]["counts"]).dtype))
        return losses_of(self, batch)

    monkeypatch.setattr(data, "check_mask_values", checking)
    monkeypatch.setattr(Run, "losses", stepping)
    refused = r"train.mask 'counts' must hold bool or 0/1 values \(true where a position counts\), got 2 \(int64\); return mask != 0"
    with pytest.raises(PipelineError, match=refused):
        train(p, store, out)
    plan = [rows.tolist() for rows in TransferSet(store, counted_masks(), ["logits"], batch_size=8, seed=p.train.seed).plan(0)]
    bad = next(k for k, rows in enumerate(plan) if 30 in rows)
    assert bad == 5  # the premise: a batch after the first ones
    assert [rows for rows, _ in stepped] == plan[:bad] and {dtype for _, dtype in stepped} == {torch.bool}
    batches = [thread for thread, rows in checked if rows == 8]  # not setup's check of the first two items
    assert len(batches) > bad and set(batches) == {"kdcache-prefetch"}, checked
    assert torch.load(out / CHECKPOINT, weights_only=True)["step"] == bad and not (out / "metrics.jsonl").exists()
    saved, stepped[:] = (out / CHECKPOINT).read_bytes(), []
    with pytest.raises(PipelineError, match=refused):
        train(p, store, out, resume=True)
    assert stepped == [] and (out / CHECKPOINT).read_bytes() == saved


def test_transfer_set_check_masks_serves_each_batch_s_mask_as_bool_and_refuses_a_bad_one_at_its_batch(tmp_path):
    """TransferSet.check_masks(key): each batch's mask under key checked as the batch is made (in a DataLoader worker too)
    and served as bool in batch["mask"], batch["inputs"] as it was; a batch of other values raises where it would be
    served, the batches before it served; "" checks none."""
    from torch.utils.data import DataLoader

    from extract_zoo import counted_masks

    store = str(tmp_path / "counted.zarr")
    kdcache.extract(token_pipeline(dataset="counted_masks"), store)
    transfer = TransferSet(store, counted_masks(), ["logits"], batch_size=8, seed=2)
    plan = [rows.tolist() for rows in transfer.plan(0)]
    transfer.check_masks("attention_mask")
    for batch in transfer:
        assert batch["mask"].dtype == torch.bool and torch.equal(batch["mask"], batch["inputs"]["attention_mask"])
        assert batch["inputs"]["counts"].dtype == torch.int64
    transfer.check_masks("counts")
    for workers in (0, 1):
        served = []
        with pytest.raises(PipelineError, match=r"TransferSet: mask 'counts' must hold bool or 0/1 values \(true where a position "
                                                r"counts\), got 2 \(int64\); return mask != 0"):
            for batch in DataLoader(transfer, batch_size=None, num_workers=workers):
                served.append(batch["rows"].tolist())
                assert torch.equal(batch["mask"], batch["inputs"]["counts"].bool())
        assert served == plan[:5] and 30 in plan[5], workers
    transfer.check_masks("")
    assert all("mask" not in batch for batch in transfer)


def test_an_int_train_mask_trains_as_the_bool_one_and_reaches_the_losses_as_bool(tmp_path, monkeypatch):
    """A 0/1 int64 train.mask is made bool on the device before the losses: a loss checks the values of a mask that is not
    bool itself, which on a GPU is a device sync each step (train checked them on the host already)."""
    p = functools.partial(token_pipeline, dataset="int_masks", epochs=1)
    store = str(tmp_path / "int.zarr")
    kdcache.extract(p(), store)
    seen = []
    for name in ("kl_divergence", "logit_mse", "feature_mse"):
        def spy(*args, real=getattr(losses, name), **kwargs):
            seen.append(kwargs.get("mask", args[-1]).dtype)
            return real(*args, **kwargs)
        monkeypatch.setattr(losses, name, spy)
    train(p(mask="counts"), store, tmp_path / "counts")
    assert seen and set(seen) == {torch.bool}, seen
    train(p(mask="attention_mask"), store, tmp_path / "bool")
    assert metrics(tmp_path / "counts") == [dict(m, seconds=c["seconds"]) for m, c in zip(metrics(tmp_path / "bool"), metrics(tmp_path / "counts"))]


def test_a_mask_of_the_input_tokens_against_targets_stored_with_part_of_them_names_the_select_and_a_mask_of_that_part_trains(tmp_path):
    """targets.select "1:" (a class token dropped) stores 5 of the 6 tokens the items' attention_mask covers: the error names
    the select, and a mask of the stored tokens under a key of its own (``stored_mask``, attention_mask[1:]) trains."""
    store = str(tmp_path / "selected.zarr")
    kdcache.extract(token_pipeline(dataset="odd_masks", select="1:"), store)
    with pytest.raises(ShapeMismatchError, match=r"train.mask 'attention_mask' has 6 positions per item, but the stored 'logits' has 5 "
                                                 r"tokens \(per-sample shape \[5, 12\], targets.select '1:'\); .* e.g. attention_mask\[1:\]"):
        train(token_pipeline(dataset="odd_masks", select="1:", mask="attention_mask"), store, tmp_path / "run")
    train(token_pipeline(dataset="odd_masks", select="1:", mask="stored_mask", epochs=1), store, tmp_path / "run")
    assert {"loss_kl", "loss_mse", "loss_feat:hidden"} <= set(metrics(tmp_path / "run")[-1])


def test_extract_dry_run_warns_of_a_train_mask_that_train_would_refuse():
    """Before the extract: a mask of the items' 6 tokens against logits stored with select "1:" (5 tokens), or a key the
    items do not have; a mask that fits says nothing."""
    assert kdcache.dry_run(token_pipeline(mask="attention_mask"))["warnings"] == []
    warnings = kdcache.dry_run(token_pipeline(select="1:", mask="attention_mask"))["warnings"]
    assert len(warnings) == 1 and re.fullmatch(r"kdcache train would refuse this store: <dict>: train.mask 'attention_mask' has 6 positions "
                                               r"per item, but the stored 'logits' has 5 tokens .*", warnings[0])
    assert re.search(r"train.mask = 'mask' is not an entry of the dataset's inputs",
                     kdcache.dry_run(token_pipeline(mask="mask"))["warnings"][0])


def test_a_train_mask_where_no_term_is_per_token_is_refused(tiny_store, tmp_path):
    with pytest.raises(PipelineError, match=r"train.mask = 'attention_mask' masks per-token terms .* no term of this run is per-token "
                                            r"\(per-sample shapes: logits \[4\], features.3 \[\d+, \d+, \d+\]\) and no student select pools, so it would "
                                            r"change nothing; set train.mask = \"\""):
        train(pipeline("train.eval_split=''", "train.mask='attention_mask'"), tiny_store, tmp_path / "run")


def test_a_train_mask_of_inputs_that_are_not_a_dict_is_refused(tmp_path):
    """A token tagger of images: per-token (16, 5) logits, its inputs a tensor, where no mask can be."""
    from kdcache.pipeline import from_dict

    p = from_dict({"teacher": {"factory": "architectures.py:tagger_teacher"}, "data": {"factory": "architectures.py:images"},
                   "targets": {"dtype": "float32"}, "extract": {"batch_size": 8, "device": "cpu"},
                   "student": {"factory": "architectures.py:tagger_student"},
                   "train": {"epochs": 1, "batch_size": 8, "device": "cpu", "mask": "attention_mask"}}, root=FIXTURES)
    kdcache.extract(p, str(tmp_path / "tagger.zarr"))
    with pytest.raises(PipelineError, match=r"train.mask = 'attention_mask' names an entry of the dataset's dict inputs, but its items' "
                                            r"inputs are float32\[2, 3, 8, 8\] \(batched\), not a dict"):
        train(p, str(tmp_path / "tagger.zarr"), tmp_path / "run")


@pytest.mark.parametrize("shorter", ["--epochs", "train.steps"])
def test_a_resume_that_shortened_the_plan_to_its_checkpoint_is_finished_after_it(tiny_store, tmp_path, shorter):
    """A --resume whose shorter plan (--epochs lowered, or train.steps set) ends where the checkpoint was saved, its last
    metrics line there whole, writes the weights (the run ends there) but saved no checkpoint: the checkpoint kept the
    longer plan it was trained under, which _finished compared with the one asked for, so every later --resume of that
    shorter plan resumed the run again and wrote student.pt and heads.pt again. It is finished now: it says so and writes
    nothing; the longer plan still trains on, and a plan shorter than the run has trained is still refused."""
    out = tmp_path / "run"
    args = ["train", str(TINY_TOML), "--cache", tiny_store, "--out", str(out), "--no-progress",
            *(a for s in [*PLAIN, "train.epochs=3"] for a in ("--set", s))]
    train_cut_after_first_epoch(pipeline(*PLAIN, "train.epochs=3"), tiny_store, out)  # after epoch 0 (step 7) of 3
    lines = (out / "metrics.jsonl").read_text()
    short = ["--epochs", "1"] if shorter == "--epochs" else ["--set", "train.steps=7"]
    ended = CliRunner().invoke(cli.main, [*args, "--resume", *short])
    assert ended.exit_code == 0 and f"resuming {str(out)!r} after epoch 0 (step 7 of 7)" in ended.output, ended.output
    assert (out / "student.pt").is_file() and (out / "metrics.jsonl").read_text() == lines
    files = {f.name: (f.stat().st_mtime_ns, f.read_bytes()) for f in out.iterdir()}
    setting = "train.epochs = 1" if shorter == "--epochs" else "train.steps = 7"
    for flag in ("--resume", "--auto-resume"):
        again = CliRunner().invoke(cli.main, [*args, flag, *short])
        assert again.exit_code == 0 and again.output == (
            f"{str(out)!r} already finished its run ({setting}, step 7); its student is {str(out / 'student.pt')!r}: nothing was "
            f"trained or written (raise {setting.split(' =')[0]} to train on, or --overwrite to start afresh)\n"), again.output
        assert {f.name: (f.stat().st_mtime_ns, f.read_bytes()) for f in out.iterdir()} == files
    on = CliRunner().invoke(cli.main, [*args, "--resume", "--epochs", "2"])  # the checkpoint's weights train on
    assert on.exit_code == 0 and f"resuming {str(out)!r} after epoch 0 (step 7 of 14)" in on.output, on.output
    assert [m["epoch"] for m in metrics(out)] == [0, 1]
    refused = CliRunner().invoke(cli.main, [*args, "--resume", *short])
    assert refused.exit_code == 1 and "this run has trained 14 steps in 2 epochs, more than" in refused.output, refused.output


def test_a_remote_read_that_fails_after_a_checkpoint_says_to_rerun_with_resume(tiny_store, tmp_path):
    """The HTTP server a streaming run reads from goes away in its second epoch (killed while it holds a read of shard
    2's logits): the run ends with the read's one line, whose advice was "…then rerun"; the same command is then refused
    ("already holds a training run; pass --resume"), so the line names --resume, the command that goes on from the
    checkpoint the first epoch left."""
    root = tmp_path / "www"
    root.mkdir()
    shutil.copytree(tiny_store, root / "s.zarr")
    (root / ".faults").write_text(json.dumps({"s.zarr/targets/logits/c/2/0": "hold:1"}))
    served = served_folder(root, str(FIXTURES / "faulty_http.py"))
    _, base = next(served)
    out = tmp_path / "run"
    args = ["train", str(TINY_TOML), "--cache", f"{base}/s.zarr", "--out", str(out), "--epochs", "2", "--no-progress",
            "--set", "train.memory_budget_mb=0", "--set", "train.shuffle_buffer_shards=1", *(x for s in PLAIN for x in ("--set", s))]
    proc = subprocess.Popen([sys.executable, "-m", "kdcache.cli", *args], env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (root / ".held").exists():
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "the read was not held within 240 s"
            time.sleep(0.01)
    finally:
        next(served, None)  # the server stops (SIGTERM): its held connection is dropped
    stderr = proc.communicate(timeout=120)[1]
    assert proc.returncode == 1, stderr
    assert (out / CHECKPOINT).is_file() and [m["epoch"] for m in metrics(out)] == [0]
    assert re.fullmatch(r"Error: cannot read .*s\.zarr.*nothing says the store is damaged: check the connection, endpoint, "
                        r"credentials and that the server is up, then run the same command with --resume to go on from its "
                        r"last checkpoint \(after epoch 0\)", stderr.strip()), stderr


@pytest.mark.parametrize("workers", [0, 2], ids=["no-workers", "dataloader-workers"])
@pytest.mark.parametrize("fault", ["store-removed", "dataset-raising"])
def test_a_failure_after_a_checkpoint_says_to_rerun_with_resume_with_or_without_workers(tiny_store, tmp_path, monkeypatch, fault,
                                                                                        workers):
    """The store a streaming run reads is removed, or its dataset starts raising (a share unmounted), as epoch 0's last
    step trains: epoch 1's first batch ends the run with the store's or the dataset's one line, whose advice ("rerun once
    the store is in place again", "then rerun") names --resume, with DataLoader workers as without. A removed store read
    by workers was cut to "Error:  to go on from its last checkpoint (after epoch 0)": the advice was rewritten in torch's
    text around the worker's error, past its last line break, the line the CLI prints."""
    store, out, flag = tmp_path / "s.zarr", tmp_path / "run", tmp_path / "unmounted"
    shutil.copytree(tiny_store, store)
    monkeypatch.setenv("KDCACHE_TEST_FLAG", str(flag))
    losses_of, calls = Run.losses, iter(range(1, 10**9))

    def failing_after_epoch_0s_last_step(self, batch):  # 7 steps an epoch: epoch 1's reads come after its checkpoint
        if next(calls) == 7:
            if fault == "store-removed":
                shutil.rmtree(store)
            else:
                flag.touch()
        return losses_of(self, batch)

    monkeypatch.setattr(Run, "losses", failing_after_epoch_0s_last_step)
    result = CliRunner().invoke(cli.main, ["train", str(TINY_TOML), "--cache", str(store), "--out", str(out), "--epochs", "2", "--no-progress",
                                           *(x for s in [*PLAIN, "train.memory_budget_mb=0", "train.shuffle_buffer_shards=1",
                                                         "data.factory='bad_input.py:raising_once_flagged'", f"train.num_workers={workers}"]
                                             for x in ("--set", s))])
    assert result.exit_code == 1, result.output
    said = {"store-removed": rf"{re.escape(repr(str(store)))} was removed or replaced while this reader used it: .*; run the same command "
                             r"with --resume once the store is in place again",
            "dataset-raising": r"the dataset raised OSError: share unmounted reading image \d+ .*; fix data.factory's dataset .*, then "
                               r"run the same command with --resume"}[fault]
    assert re.fullmatch(rf"Error: {said} to go on from its last checkpoint \(after epoch 0\)", result.output.strip()), result.output
    assert [m["epoch"] for m in metrics(out)] == [0] and (out / CHECKPOINT).is_file()



@pytest.mark.parametrize("held", ["loading", "training"])
def test_a_second_run_into_the_out_of_a_run_still_going_is_told_that_first(tiny_store, tmp_path, held):
    """A run into an --out whose run is still going, given without flags, --resume or --overwrite, is told that the run is
    still going, and nothing of it changes. The first held while it loads its store, dataset and student (a --resume of
    a run that trained an epoch; its lock was taken only after that): a second without flags was told "already holds a
    training run; pass --resume", and a --resume trained, the two runs into one --out at once. The first held in its
    third epoch: told so already."""
    out, hold = tmp_path / "run", tmp_path / "hold"
    args = [str(TINY_TOML), "--cache", tiny_store, "--out", str(out), "--epochs", "4", "--no-progress",
            "--set", 'data.factory="numbered.py:tiny_slow"', *(x for s in PLAIN for x in ("--set", s))]
    first = args
    if held == "loading":
        assert CliRunner().invoke(cli.main, ["train", *args, "--epochs", "1"]).exit_code == 0
        first = [*args, "--resume"]
    hold.touch()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KDCACHE_TEST_HOLD": str(hold),
           "KDCACHE_TEST_HOLD_AFTER": "0" if held == "loading" else "150"}
    proc = subprocess.Popen([sys.executable, "-m", "kdcache.cli", "train", *first], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not Path(f"{hold}.held").exists():
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "the read was not held within 240 s"
            time.sleep(0.01)
        saved = (out / CHECKPOINT).read_bytes()
        for flags in ([], ["--resume"], ["--overwrite"]):
            result = CliRunner().invoke(cli.main, ["train", *args, *flags])
            assert result.exit_code == 1 and re.fullmatch(
                rf"Error: {re.escape(repr(str(out)))} is the output folder of a training run still going \(kdcache train pid "
                rf"{proc.pid} on .*\); wait for it to end or stop it, then rerun \(nothing was changed\)\n", result.output), (flags, result.output)
        assert (out / CHECKPOINT).read_bytes() == saved
    finally:
        hold.unlink()
    assert proc.wait(timeout=120) == 0, proc.stderr.read()
    assert [m["epoch"] for m in metrics(out)] == [0, 1, 2, 3]
