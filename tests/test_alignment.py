"""Ways a cached target could be paired with the wrong sample, or a user mistake could end in a traceback:
each must stop with one line that names the cause and the fix (found by an audit of the alignment promise).

The ``numbered`` fixtures (tests/fixtures/numbered.py) make a pairing visible: item ``i``'s input is filled
with ``i`` and the ``echo`` teacher's logits are ``i + (0, 1, 2, 3)``.
"""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
import torch
import zarr

import kdcache
from conftest import FIXTURES, NUMBERED
from kdcache import data, store as layout, teacher as teachers
from kdcache.cache import TransferSet
from kdcache.errors import AlignmentError, PipelineError, StoreError, TargetError
from kdcache.pipeline import from_dict
from numbered import SPANS, Augmented, BulkyEcho, Numbered, Segments, SortedGetitems, Spans, WrongCountGetitems, live_tensor_bytes, refilled_buffer_subset

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


def test_extract_refuses_a_getitems_that_serves_a_batch_out_of_order(tmp_path):
    """Positions 1 and 2 of each batch swapped, position 0 right: extract wrote rows whose inputs and targets were other
    indices' than samples/index says, each row consistent with itself, so verify passed (only training noticed, and
    blamed the dataset as changed since extraction, which re-extracting repeats). The probe batch is compared item by
    item with the items read alone, before the teacher runs over the data."""
    out = tmp_path / "s.zarr"
    with pytest.raises(PipelineError, match=r"^the dataset's __getitems__ gives index 1 as another input \(fingerprint [0-9a-f]{16}\) than "
                                            r"dataset\[1\] does \([0-9a-f]{16}\); make __getitems__ return the items dataset\[i\] returns, in the order asked$"):
        kdcache.extract(from_dict({**NUMBERED, "data": {"factory": "numbered.py:swapping"}}, root=FIXTURES), str(out))
    assert not out.exists()


def test_a_refilled_buffer_behind_torch_s_subset_is_named_as_such(tmp_path, numbered_store):
    """torch's Subset has a __getitems__ of its own: items that are one buffer refilled by each read, behind a Subset, were
    called a __getitems__ that serves other inputs than dataset[i] ("make __getitems__ return the items dataset[i]
    returns"), a method the user did not write, by extract and by training (found by a review)."""
    out = tmp_path / "s.zarr"
    refilled = r"dataset index {0}, read in a batch, was the input of index {1}, the batch's last item .*__getitem__ returns one buffer"
    with pytest.raises(PipelineError, match="^" + refilled.format(0, 15)):
        kdcache.extract(from_dict({**NUMBERED, "data": {"factory": "numbered.py:refilled_buffer_subset"}}, root=FIXTURES), str(out))
    assert not out.exists()
    with pytest.raises(AlignmentError, match=r"^store row \d+ \(dataset index \d+\) .*: " + refilled.format(r"\d+", r"\d+")):
        list(transfer(numbered_store, refilled_buffer_subset()))


def test_verify_teacher_check_names_rows_that_a_getitems_served_out_of_order(tmp_path):
    """Out of order only after the first batch (the probe's): the store is extracted mis-paired. verify's teacher check
    re-read the rows in the extraction's batches, got the same swapped items back and passed; it reads each row alone
    too now, and names the rows."""
    from kdcache.verify import verify

    pipeline = from_dict({**NUMBERED, "data": {"factory": "numbered.py:swapping_after_the_first_batch"}}, root=FIXTURES)
    out = str(tmp_path / "s.zarr")
    kdcache.extract(pipeline, out)
    assert kdcache.open_store(out).read(layout.LOGITS, 16, 19)[:, 0].tolist() == [16.0, 18.0, 17.0]  # the premise: rows 17 and 18 mis-paired
    report = verify(out, teacher_check=N, pipeline=pipeline)
    teacher = next(c for c in report["checks"] if c["name"] == "teacher")
    assert not report["ok"] and teacher["problem_count"] == 2 * 6, teacher  # rows 17, 18, 33, 34, ... 97, 98
    assert teacher["problems"][0].startswith("row 17: the dataset's input fingerprint "), teacher["problems"]


def test_verify_teacher_check_names_a_getitems_that_now_serves_a_batch_out_of_order(numbered_store):
    """A store extracted right, checked with a dataset whose __getitems__ serves positions 1 and 2 of a batch swapped: each
    row's item read alone is the stored one, but not the batch's; verify names those rows and the fix (the dataset's). (Its
    first batch, the probe's, is served right: a swap there is refused as the teacher is set up.)"""
    from kdcache.verify import verify

    pipeline = from_dict({**NUMBERED, "data": {"factory": "numbered.py:swapping_after_the_first_batch"}}, root=FIXTURES)
    report = verify(numbered_store, teacher_check=N, pipeline=pipeline)
    teacher = next(c for c in report["checks"] if c["name"] == "teacher")
    getitems = [p for p in teacher["problems"] if "__getitems__" in p]
    assert not report["ok"] and getitems, teacher["problems"]
    assert re.fullmatch(r"row (\d+): the dataset's __getitems__ gives it another input \([0-9a-f]{16}\) than dataset\[\1\] \([0-9a-f]{16}\): "
                        r"make __getitems__ return the items dataset\[i\] returns, in the order asked", getitems[0]), getitems[0]


@pytest.mark.parametrize("teacher, batch_size, seen", [
    ("sorting_echo", 16, "sample 0 read alone gives the probe batch's row 15, not its row 0"),
    ("sorting_echo", 2, "sample 0 read alone gives the probe batch's row 1, not its row 0"),
    ("remainder_sorting_echo", 16, r"with the probe batch's samples moved one place, row 3 \(sample 4\) holds sample 0's output"),
], ids=["reversed", "swapped", "first-row-in-place"])
def test_a_teacher_that_returns_its_rows_in_another_order_is_refused_before_the_store_is_made(tmp_path, teacher, batch_size, seen):
    """A teacher that sorts its batch (by length, for packed sequences) and never puts the rows back: each row's targets
    were another sample's, stored under the right input's fingerprint, so training's check passed them all (exit 0, with a
    note blaming BatchNorm). Sample 0 alone, and the probe batch with its samples moved one place, show the rows moved."""
    out = tmp_path / "s.zarr"
    pipeline = from_dict({**NUMBERED, "teacher": {"factory": f"numbered.py:{teacher}"},
                          "extract": {**NUMBERED["extract"], "batch_size": batch_size}}, root=FIXTURES)
    with pytest.raises(TargetError, match=rf"^target 'logits': {seen}: the teacher returns the rows of its output in another order "
                                          r"than its inputs, .*nothing was written.*output\[order\.argsort\(\)\]\)$"):
        kdcache.extract(pipeline, str(out))
    assert not out.exists()


def test_the_setup_checks_keep_only_the_probe_batchs_targets_while_the_teacher_runs_again(monkeypatch):
    """The probe batch's whole output (here an activation map no target stores; a large teacher's hidden states) stayed
    alive while sample 0 alone and the probe batch with its samples moved ran, and the moved batch's too while the rows
    were compared: two batches of it at once, at setup, before any work (an out-of-memory where the run fits). Only the
    probe batch's targets are kept now, and the moved batch's targets alone are compared."""
    from kdcache.extract import setup

    compared, row_distance = [], teachers.row_distance
    monkeypatch.setattr(teachers, "row_distance", lambda row, other: compared.append(live_tensor_bytes()) or row_distance(row, other))
    run = setup(from_dict({**NUMBERED, "teacher": {"factory": "numbered.py:bulky_echo"}}, root=FIXTURES))
    sample = BulkyEcho.BULK * 4  # one sample's activation map: 256 KiB
    (probe, before), *again = run.model.calls
    assert probe == 16 and [rows for rows, _ in again] == [1, 16], run.model.calls  # sample 0 alone; the moved batch
    assert all(live - before < sample for _, live in again) and compared, run.model.calls
    assert max(compared) - before < sample, f"{(max(compared) - before) / sample:.1f} samples' activation maps alive while comparing"
    # and once setup returns, not even the probe batch's targets: the run holds no batch of them beside its own
    assert "outputs" not in run.probe and setup(from_dict(NUMBERED, root=FIXTURES), keep_probe=True).probe["outputs"]


@pytest.mark.parametrize("student, seen", [
    ("sorting_student", r"for dataset sample 0 alone is its row 7 in a batch of samples 0 to 7, not its row 0"),
    ("ascending_sorting_student", r"for a batch of samples 1 to 7, then 0 holds at row 0 \(sample 1's place\) sample 0's row of a batch of "
                                  r"samples 0 to 7"),
    ("tie_sorting_student", r"for dataset sample 0 alone is its row 6 in a batch of samples 0 to 7, not its row 0"),
    ("ascending_tie_sorting_student", r"for a batch of samples 1 to 7, then 0 holds at row 1 \(sample 2's place\) sample 0's row of a "
                                      r"batch of samples 0 to 7"),
], ids=["reversed", "batch-in-order", "samples-0-and-1-tied", "samples-0-and-1-tied-batch-in-order"])
def test_a_student_that_returns_its_rows_in_another_order_is_refused_before_training(numbered_store, tmp_path, student, seen):
    """The same mistake in the student: each sample's stored targets were compared with another sample's output (a
    loss that fell, on a mapping of the wrong pairs), without a word. Setup's probe batch (samples 0 to 7, train.batch_size)
    shows it: sample 0 alone is another row, or the batch with each sample moved one place gives a row in another's place.
    A probe of samples 0 and 1 alone missed a student that stably sorts by a key (a length) those two share (tie)."""
    out = tmp_path / "run"
    with pytest.raises(TargetError, match=rf"^the student's output {seen}: the student returns the rows of its output in another order "
                                          r"than its inputs, .*another sample's output; .*output\[order\.argsort\(\)\]\)$"):
        kdcache.train(numbered(student={"factory": f"numbered.py:{student}"}), numbered_store, out)
    assert not (out / "checkpoint.pt").exists()
    kdcache.train(numbered(), numbered_store, tmp_path / "plain")  # the same student, rows in order


@pytest.fixture(scope="module")
def layered_store(tmp_path_factory) -> str:
    """The numbered store with the teacher layer ``body`` (``layered_echo``: 16 values ``i`` per sample) beside its logits."""
    store = str(tmp_path_factory.mktemp("stores") / "layered.zarr")
    kdcache.extract(from_dict({**NUMBERED, "teacher": {"factory": "numbered.py:layered_echo"},
                               "targets": {**NUMBERED["targets"], "layers": ["body"]}}, root=FIXTURES), store)
    return store


@pytest.mark.parametrize("loss", [{"kl": 1.0}, {"kl": 0.0, "ce": 0.0}], ids=["with-logits", "features-only"])
def test_a_student_module_that_sees_the_batch_sorted_is_refused_as_a_feature(layered_store, tmp_path, loss):
    """A student that sorts its batch (by length, for packed sequences), runs a module on it and puts back only its
    output: its output passed setup's order check, and the module's rows, which train.features distills, stayed sorted,
    so each sample's stored layer was compared with another sample's features, without a word (found by a review). Each
    train.features module's rows are checked as the output's are, also where no loss compares the output."""
    from numbered import SortedBodyStudent

    seen = []
    student = SortedBodyStudent()
    student.body.register_forward_hook(lambda module, args, out: seen.append(args[0][:, 0].tolist()))
    student(torch.stack([Numbered()[i][0] for i in range(3)]))
    assert seen == [[2.0, 1.0, 0.0]]  # the premise: the module's rows are the samples sorted, not in the batch's order
    train = {"epochs": 1, "batch_size": 8, "device": "cpu", "loss": loss, "features": {"body": {"student": "body"}}}
    out = tmp_path / "run"
    with pytest.raises(TargetError, match=r"^train.features 'body': student module 'body''s output for dataset sample 0 alone is its "
                                          r"row 7 in a batch of samples 0 to 7, not its row 0: the module gets the student's batch in "
                                          r"another order than its inputs .*another sample's features; distill a module whose rows "
                                          r"follow the inputs .*output\[order\.argsort\(\)\]\)$"):
        kdcache.train(numbered(student={"factory": "numbered.py:sorted_body_student"}, train=train), layered_store, out)
    assert not (out / "checkpoint.pt").exists()
    kdcache.train(numbered(student={"factory": "numbered.py:flat_student"}, train={**train, "features": {"body": {"student": "fc"}}}),
                  layered_store, tmp_path / "plain")  # a module whose rows follow the inputs


def test_a_student_whose_output_rows_move_is_refused_where_only_the_evaluation_compares_them(layered_store, tmp_path):
    """Features alone (kl = ce = 0) left the output's row order unchecked, and eval_accuracy (eval_agreement, with an eval
    store) compared each sample's label (stored logits) with another sample's output, without a word (found by a review).
    The output is checked wherever the evaluation compares it."""
    from numbered import SortingHeadStudent

    x = torch.stack([Numbered()[i][0] for i in range(3)])
    student = SortingHeadStudent()
    assert torch.equal(student(x), student.fc(student.body(x.flatten(1)))[[2, 1, 0]])  # the premise: the output's rows reversed
    features = {"epochs": 1, "batch_size": 8, "device": "cpu", "loss": {"kl": 0.0, "ce": 0.0}, "features": {"body": {"student": "body"}}}
    pipeline = numbered(student={"factory": "numbered.py:sorting_head_student"}, train={**features, "eval_split": "train"})
    with pytest.raises(TargetError, match=r"^the student's output for dataset sample 0 alone is its row 7 in a batch of samples 0 to 7, "
                                          r"not its row 0: the student returns the rows of its output in another order"):
        kdcache.train(pipeline, layered_store, tmp_path / "run")
    pipeline = numbered(student={"factory": "numbered.py:sorting_head_student"}, train=features)
    assert "eval_accuracy" not in kdcache.train(pipeline, layered_store, tmp_path / "no-eval")  # nothing compares the output


def test_a_student_that_mixes_its_batch_is_not_taken_for_one_that_moves_its_rows(numbered_store, tmp_path):
    """A student on batch statistics whose output saturates: sample 0 alone gave sample 1's row of the pair, and train
    refused it as returning its rows in another order, where its rows follow their samples (sample 1 alone is its own)."""
    student = {"factory": "numbered.py:confident_batch_statistics_student"}
    assert kdcache.train(numbered(student=student), numbered_store, tmp_path / "run")


def test_a_student_row_check_skipped_for_device_memory_says_so(numbered_store, tmp_path, capfd):
    """The student's row checks run it again (sample 0 alone, the probe batch moved one place); one that ran out of device
    memory was skipped in silence (its DeviceMemoryError is a ModelError, which the check lets be): a student that
    reorders its rows then trained unnoticed. It is still not refused (its batches fit), but said in one warning line."""
    assert kdcache.train(numbered(student={"factory": "numbered.py:out_of_memory_alone_student"}), numbered_store, tmp_path / "run")
    lines = [line for line in capfd.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(lines) == 1, lines
    assert lines[0].startswith("warning: the check of the student's rows (a student that returns its rows, or a train.features "
                               "module's, in another order than its inputs) was skipped: the student ran out of device memory "
                               "(OutOfMemoryError: CUDA out of memory. Tried to allocate 512.00 MiB (at numbered.py:"), lines[0]
    assert "output[order.argsort()]" in lines[0]


def test_a_student_feature_check_skipped_for_device_memory_says_so(layered_store, tmp_path, capfd):
    """The check that a ``train.features`` module's first axis is the samples runs the student on sample 0 alone; one that
    ran out of device memory there was skipped in silence (a ModelError, which that check lets be as a student refusing a
    batch of one). Not refused (its batches fit), but said, before the row checks' own warning."""
    train = {"epochs": 1, "batch_size": 8, "device": "cpu", "features": {"body": {"student": "fc"}}}
    assert kdcache.train(numbered(student={"factory": "numbered.py:out_of_memory_alone_student"}, train=train), layered_store,
                         tmp_path / "run")
    lines = [line for line in capfd.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(lines) == 2, lines
    assert lines[0].startswith("warning: the check that each train.features module's first axis is the samples was skipped: the "
                               "student ran out of device memory (OutOfMemoryError: CUDA out of memory. Tried to allocate 512.00 MiB "
                               "(at numbered.py:"), lines[0]
    assert lines[0].endswith("distill a batch-first output, or train where a batch of one sample fits"), lines[0]
    assert lines[1].startswith("warning: the check of the student's rows"), lines[1]


# ------------------------------------------------------------------ items that are not deterministic

def test_random_augmentation_is_refused_at_extract_before_the_teacher_runs_over_the_data(tmp_path):
    """The store would record one random draw per input, which no later read reproduces: every training run would fail."""
    out = tmp_path / "s.zarr"
    with pytest.raises(AlignmentError, match=r"dataset index 0 gives a different input each time it is read.*random augmentation"):
        kdcache.extract(from_dict({**NUMBERED, "data": {"factory": "numbered.py:augmented"}}, root=FIXTURES), str(out))
    assert not out.exists()


@pytest.mark.parametrize("budget", [2048.0, 0.0], ids=["memory", "stream"])
def test_random_augmentation_at_training_is_named_as_such(numbered_store, budget):
    """It was 'the dataset changed since extraction ... or re-extract': re-extracting cannot fix it."""
    ts = transfer(numbered_store, Numbered(N), memory_budget_mb=budget)
    ts.dataset = Augmented()  # the plain items passed the start-up check; the augmented ones come with the batches
    with pytest.raises(AlignmentError, match=r"store row \d+ \(dataset index \d+\).*gives a different input each time it is read"
                                             r".*random augmentation.*extract again if the store was made from random items"):
        list(ts)


def test_getitems_serving_another_order_than_asked_is_named(numbered_store):
    """It was 'the dataset changed since extraction (order, content or preprocessing)': dataset[i] had not changed."""
    with pytest.raises(AlignmentError, match=r"store row (\d+) \(dataset index \1\).*dataset\[\1\] gives the stored input.*__getitems__.*in the order asked"):
        list(transfer(numbered_store, SortedGetitems()))


# ------------------------------------------------------------------ fingerprint checks switched off

@pytest.mark.parametrize("budget", [2048.0, 0.0], ids=["memory", "stream"])
def test_checks_switched_off_still_catch_a_reversed_dataset_at_the_start(numbered_store, budget):
    """fingerprint_check = fingerprint_recheck = 0 served every row of a reversed dataset against the wrong target:
    the inputs the store's manifest records (the first and the last) are checked whatever the fractions."""
    reversed_ = Numbered(N, order=list(range(N))[::-1])
    with pytest.raises(AlignmentError, match=rf"dataset index 0 .*{numbered_store}.*order, content or preprocessing"):
        transfer(numbered_store, reversed_, memory_budget_mb=budget, fingerprint_check=0.0, fingerprint_recheck=0.0)


def test_train_with_checks_switched_off_refuses_a_reversed_dataset(numbered_store, tmp_path):
    off = {"epochs": 1, "batch_size": 8, "device": "cpu", "fingerprint_check": 0.0, "fingerprint_recheck": 0.0}
    with pytest.raises(AlignmentError, match=r"dataset index 0 "):
        kdcache.train(numbered(train=off, data={"factory": "numbered.py:reversed_numbers"}), numbered_store, tmp_path / "run")
    assert not (tmp_path / "run" / "student.pt").exists()


# ------------------------------------------------------------------ a run resumed inside an epoch

@pytest.mark.parametrize("budget", [2048.0, 0.0], ids=["memory", "stream"])
def test_a_run_resumed_inside_an_epoch_checks_every_row_of_the_next_epoch(numbered_store, budget):
    """A run resumed after batch B of an epoch checked the rest of that epoch at fingerprint_check and every later epoch
    at fingerprint_recheck (train: 5 %): a sample changed between the interruption and the resume, served in the first
    B batches, was paired with its old target in every later epoch unless the recheck drew it (found by a review). The
    epoch after a partial first one is checked as a first one: its rows include those the resumed run has not checked."""
    uninterrupted = transfer(numbered_store, Numbered(N), memory_budget_mb=budget)
    uninterrupted.set_epoch(1)
    served = [int(i) for b in list(uninterrupted)[:5] for i in b["index"]]
    changed = next(i for i in served if i not in (0, N - 1))  # not one of the two the manifest records, checked at the start
    resumed = transfer(numbered_store, Numbered(N, changed=(changed,)), memory_budget_mb=budget, fingerprint_recheck=0.0)
    resumed.set_epoch(1, skip=5)
    assert changed not in {int(i) for b in resumed for i in b["index"]}  # the premise: the rest of epoch 1 does not serve it
    resumed.set_epoch(2)
    with pytest.raises(AlignmentError, match=rf"^store row {changed} \(dataset index {changed}\) .*the dataset changed since extraction"):
        list(resumed)
    resumed.set_epoch(3)  # later epochs: the recheck fraction
    assert sum(len(b["rows"]) for b in resumed) == N


# ------------------------------------------------------------------ an eval store of another teacher

def test_eval_cache_of_another_teacher_is_refused(numbered_store, tmp_path):
    """eval_agreement measured agreement with another teacher than the one distilled, without a word."""
    other = str(tmp_path / "other-teacher.zarr")
    kdcache.extract(from_dict({**NUMBERED, "teacher": {"factory": "numbered.py:negated_echo"}}, root=FIXTURES), other)
    train = {"epochs": 1, "batch_size": 8, "device": "cpu", "eval_cache": other}
    with pytest.raises(PipelineError, match=r"train.eval_cache .* was made by another teacher .*weights sha256 [0-9a-f]{12}.*"
                                            r"[0-9a-f]{12}.*with the same teacher"):
        kdcache.train(numbered(train=train), numbered_store, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_eval_cache_of_the_training_samples_is_refused_unless_eval_split_names_them(numbered_store, tmp_path):
    """The training store as train.eval_cache reported eval_agreement 0.99 on the very samples trained on, as an eval metric."""
    train = {"epochs": 1, "batch_size": 8, "device": "cpu", "eval_cache": numbered_store}
    with pytest.raises(PipelineError, match=r"holds the samples the student trains on \(split 'train'.*eval_split = 'train' to measure it on purpose"):
        kdcache.train(numbered(train=train), numbered_store, tmp_path / "run")
    result = kdcache.train(numbered(train={**train, "eval_split": "train"}), numbered_store, tmp_path / "run")
    assert "eval_agreement" in result


# ------------------------------------------------------------------ a store replaced while training starts

@pytest.mark.parametrize("which", ["training", "eval_cache"])
def test_a_store_replaced_between_setup_and_its_reader_is_refused(numbered_store, tmp_path, monkeypatch, which):
    """train opens a store for its setup checks, and its reader (TransferSet) opens it again after data.factory and
    student.factory ran: a store replaced in between (another extract --overwrite) was trained or scored from without a
    word, where setup checked, and the checkpoint records, the first. Both stores are refused so."""
    trained, scored = str(tmp_path / "trained.zarr"), str(tmp_path / "scored.zarr")
    shutil.copytree(numbered_store, trained)
    shutil.copytree(numbered_store, scored)
    monkeypatch.setenv("KDCACHE_TEST_REPLACED", trained if which == "training" else scored)
    train = {"epochs": 1, "batch_size": 8, "device": "cpu", "eval_cache": scored, "eval_split": "train"}
    with pytest.raises(StoreError, match=rf"^'{re.escape(trained if which == 'training' else scored)}' was replaced between its first "
                                         r"opening and this reader's: its manifest's created was '[^']+' when first opened and is "
                                         r"'2030-01-\d\dT00:00:00\+00:00' now \(another kdcache extract --overwrite"):
        kdcache.train(numbered(data={"factory": "numbered.py:replacing_a_store", "split": "train"}, train=train), trained, tmp_path / "run")
    assert not (tmp_path / "run" / "student.pt").exists()


# ------------------------------------------------------------------ labels changed since extraction

@pytest.mark.parametrize("budget", [2048.0, 0.0], ids=["memory", "stream"])
def test_a_label_changed_since_extraction_is_found_where_the_input_is_checked(numbered_store, budget):
    """The same input with another label (a new class mapping): ce would train on the stored label while eval_split
    scores the dataset's. Checked rows compare the label too; an unchecked row is not looked at."""
    with pytest.raises(AlignmentError, match=r"store row 37 \(dataset index 37\) .* holds label 1 but the dataset now gives 2: its "
                                             r"labels changed since extraction.*re-extract"):
        list(transfer(numbered_store, Numbered(N, relabeled=(37,)), memory_budget_mb=budget))
    every = tuple(range(1, N - 1))  # the first and last items (checked at the start) keep theirs
    with pytest.raises(AlignmentError, match=r"holds label \d but the dataset now gives \d"):
        list(transfer(numbered_store, Numbered(N, relabeled=every), fingerprint_check=0.05, memory_budget_mb=budget))
    served = list(transfer(numbered_store, Numbered(N, relabeled=(37,)), fingerprint_check=0.0, memory_budget_mb=budget))
    assert sum(len(b["rows"]) for b in served) == N


# ------------------------------------------------------------------ inputs holding Python numbers

SPANS_PIPELINE = {"teacher": {"factory": "numbered.py:span_teacher"}, "data": {"factory": "numbered.py:spans", "split": "train"},
                  "targets": {"logits": True, "dtype": "float32"}, "extract": {"batch_size": 4, "device": "cpu", "rows_per_shard": 8}}
# written by kdcache 0.1.6 (commit 15ae3aa) from SPANS_PIPELINE: 20 rows in 3 shards, fingerprints "blake2b-64"
OLD_STORE = FIXTURES / "stores" / "spans-0.1.6.zarr"


def served_spans(location: str, dataset) -> dict[int, tuple[float, float]]:
    """Dataset index -> the (start, end) its served logits name (the span_teacher's first two values)."""
    rows = {}
    for batch in TransferSet(location, dataset, [layout.LOGITS], batch_size=4, shuffle=False):
        for i, logits in zip(batch["index"].tolist(), batch["targets"][layout.LOGITS].tolist()):
            rows[i] = (logits[0], logits[1])
    return rows


def spans_pipeline(factory: str = "numbered.py:spans") -> kdcache.Pipeline:
    return from_dict({**SPANS_PIPELINE, "data": {"factory": factory, "split": "train"}}, root=FIXTURES)


EXPECTED_SPANS = {i: (float(s), float(e)) for i, (s, e) in enumerate({1: (1, 23), 2: (12, 3)}.get(i, (i, 100 + i)) for i in range(SPANS))}


def test_inputs_whose_numbers_read_alike_are_told_apart(tmp_path):
    """Items 1 and 2 hold spans (1, 23) and (12, 3): kdcache <= 0.1.6 fed numbers to the fingerprint as bare repr(), so
    both were the stream "123". A dataset whose items 1 and 2 were exchanged after extraction trained each on the
    other's targets, and training's check and verify's teacher check passed. Each number is now hashed as the tensor
    the teacher sees (FORMAT.md §9, "blake2b-64-v2")."""
    from kdcache.verify import verify

    out = str(tmp_path / "s.zarr")
    kdcache.extract(spans_pipeline(), out)
    assert kdcache.open_store(out).manifest["fingerprint"]["algorithm"] == "blake2b-64-v2"
    assert served_spans(out, Spans()) == EXPECTED_SPANS  # the premise: each row's logits name its span
    with pytest.raises(AlignmentError, match=r"^store row 1 \(dataset index 1\) of .* has input fingerprint [0-9a-f]{16} but the "
                                            r"dataset now gives [0-9a-f]{16}: the dataset changed since extraction"):
        served_spans(out, Spans(swapped=True))
    report = verify(out, teacher_check=SPANS, pipeline=spans_pipeline("numbered.py:swapped_spans"))
    teacher = next(c for c in report["checks"] if c["name"] == "teacher")
    assert not report["ok"] and [p.split(":")[0] for p in teacher["problems"][:2]] == ["row 1", "row 2"], teacher


def test_a_sentence_pair_split_elsewhere_is_another_input(tmp_path):
    """([a, b], [c]) and ([a], [b, c]) fed one stream to the first version of "blake2b-64-v2" (lists unframed, as in
    blake2b-64): a dataset whose tokenizer moved the segment boundary after extraction was served the old targets
    without a word (found by a review). Lists are framed by their length now."""
    pipeline = from_dict({**SPANS_PIPELINE, "teacher": {"factory": "numbered.py:segment_teacher"},
                          "data": {"factory": "numbered.py:segments", "split": "train"}}, root=FIXTURES)
    out = str(tmp_path / "s.zarr")
    kdcache.extract(pipeline, out)
    assert kdcache.open_store(out).read(layout.LOGITS, 0, 1).tolist() == [[2.0, 1.0, 30.0, 30.0]]  # the premise: lengths 2 and 1
    old, new = (data.split_item(Segments(resegmented)[0])[0] for resegmented in (False, True))
    assert data.fingerprint(old, data.V1) == data.fingerprint(new, data.V1) and data.fingerprint(old) != data.fingerprint(new)
    with pytest.raises(AlignmentError, match=r"^dataset index 0 \(its fingerprint is in the manifest\) of .* the dataset changed since extraction"):
        TransferSet(out, Segments(resegmented=True), [layout.LOGITS], batch_size=4)
    assert len(list(TransferSet(out, Segments(), [layout.LOGITS], batch_size=4))) == 2


def test_a_store_of_kdcache_0_1_6_is_read_verified_and_resumed_by_its_own_fingerprints(tmp_path):
    """A store made before "blake2b-64-v2" keeps "blake2b-64": training and verify recompute its fingerprints as it
    made them, and extract resumes it with them (a store's rows are all fingerprinted alike; the new algorithm would
    call every resumed-from row changed). Only --overwrite makes it anew, with the new algorithm."""
    from kdcache.verify import verify

    store = tmp_path / "old.zarr"
    shutil.copytree(OLD_STORE, store)
    old = kdcache.open_store(store)
    assert old.manifest["kdcache_version"] == "0.1.6" and old.manifest["fingerprint"]["algorithm"] == data.V1
    fingerprints = old.read(layout.FINGERPRINT, 0, SPANS).tolist()
    assert fingerprints == [data.fingerprint(data.split_item(Spans()[i])[0], data.V1) for i in range(SPANS)]
    assert fingerprints[1] == fingerprints[2]  # the premise: 0.1.6 could not tell (1, 23) from (12, 3)
    assert served_spans(str(store), Spans()) == EXPECTED_SPANS
    assert verify(str(store), teacher_check=SPANS, pipeline=spans_pipeline())["ok"]

    zarr.open_array(store / "progress" / "done", mode="r+")[1:] = False  # shards 1 and 2 to write again
    kdcache.extract(spans_pipeline(), str(store))
    resumed = kdcache.open_store(store)
    assert resumed.complete and resumed.manifest["fingerprint"]["algorithm"] == data.V1
    for path in old.paths():
        assert np.array_equal(resumed.read(path, 0, SPANS), old.read(path, 0, SPANS)), path
    assert verify(str(store), teacher_check=SPANS, pipeline=spans_pipeline())["ok"]

    kdcache.extract(spans_pipeline(), str(store), overwrite=True)
    anew = kdcache.open_store(store)
    assert anew.manifest["fingerprint"]["algorithm"] == "blake2b-64-v2"
    assert anew.read(layout.FINGERPRINT, 0, SPANS).tolist() == [data.fingerprint(data.split_item(Spans()[i])[0]) for i in range(SPANS)]
    with pytest.raises(AlignmentError, match=r"^store row 1 \(dataset index 1\) .*the dataset changed since extraction"):
        served_spans(str(store), Spans(swapped=True))


def test_an_eval_cache_of_the_training_samples_fingerprinted_by_the_other_algorithm_is_refused(tmp_path):
    """Whether an eval store holds the training samples was decided by their probe fingerprints too: a store of kdcache
    0.1.6 and one extracted now from the same split differ in them, so eval_agreement was measured on the training
    samples without a word. Fingerprints of two algorithms are not compared: the same factory, split and length decide."""
    store, anew = tmp_path / "old.zarr", str(tmp_path / "new.zarr")
    shutil.copytree(OLD_STORE, store)
    kdcache.extract(spans_pipeline(), anew)
    train = {"epochs": 1, "batch_size": 4, "device": "cpu", "eval_cache": anew}
    pipeline = from_dict({**SPANS_PIPELINE, "student": {"factory": "numbered.py:span_student"}, "train": train}, root=FIXTURES)
    with pytest.raises(PipelineError, match=r"holds the samples the student trains on \(split 'train' of numbered.py:spans\)"):
        kdcache.train(pipeline, str(store), tmp_path / "run")
    pipeline = from_dict({**SPANS_PIPELINE, "student": {"factory": "numbered.py:span_student"}, "train": {**train, "eval_split": "train"}},
                         root=FIXTURES)
    assert "eval_agreement" in kdcache.train(pipeline, str(store), tmp_path / "run")


def test_training_from_a_0_1_6_store_of_inputs_it_cannot_tell_apart_says_so(tmp_path, capsys):
    """A store of kdcache 0.1.6 trains as it did, with one note that its fingerprints leave inputs like this dataset's
    unchecked and how to have them checked; a store extracted now, or one of plain tensors, says nothing of it."""
    store, anew = tmp_path / "old.zarr", str(tmp_path / "new.zarr")
    shutil.copytree(OLD_STORE, store)
    kdcache.extract(spans_pipeline(), anew)
    pipeline = from_dict({**SPANS_PIPELINE, "student": {"factory": "numbered.py:span_student"},
                          "train": {"epochs": 1, "batch_size": 4, "device": "cpu"}}, root=FIXTURES)
    kdcache.train(pipeline, str(store), tmp_path / "old-run")
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: ")]
    assert notes == [f"note: {str(store)!r} was made by kdcache <= 0.1.6, whose input fingerprints (blake2b-64) feed int values unframed, "
                     "and this dataset's inputs hold them: two inputs that read alike ((1, 23) and (12, 3), or ([1, 2], [3]) and "
                     "([1], [2, 3])) pass its check as one; re-extract the store (overwrite=True) to have every pairing checked"], notes
    kdcache.train(pipeline, anew, tmp_path / "new-run")
    assert "note: " not in capsys.readouterr().out
    assert data.v1_blind_spot({"ids": Numbered()[0][0], "mask": np.ones(3)}) is None  # tensors and arrays: both algorithms alike
    assert data.v1_blind_spot(([Numbered()[0][0]], [Numbered()[1][0]])) == "lists in a list"


# ------------------------------------------------------------------ a damaged samples/index

@pytest.mark.parametrize("budget", [2048.0, 0.0], ids=["memory", "stream"])
def test_a_damaged_index_of_a_store_without_digests_is_named_as_damage_not_read_as_another_sample(numbered_store, tmp_path, budget):
    """Row r holds dataset index r (FORMAT.md §4). A store without digests (kdcache < 0.1.1), whose samples/index says -1
    at row 5: the reader fetched the dataset's item -1 (its last) for row 5's targets, and the fingerprint check (where it
    looked at that row) called the dataset changed. Every batch's index is checked against its rows: named as damage."""
    import json

    store = tmp_path / "damaged.zarr"
    shutil.copytree(numbered_store, store)
    shutil.rmtree(store / "progress/digest")
    root = json.loads((store / "zarr.json").read_text())
    del root["attributes"]["kdcache"]["compression"]["shard_digests"]
    (store / "zarr.json").write_text(json.dumps(root))
    index = zarr.open_array(str(store / layout.INDEX), mode="r+", zarr_format=3)
    index[5] = -1
    with pytest.raises(StoreError, match=rf"^'{re.escape(str(store))}' is damaged: store row 5 holds dataset index -1 in samples/index, "
                                         r"where a store's row r holds index r \(FORMAT.md §4\); run kdcache verify"):
        list(transfer(str(store), Numbered(N), memory_budget_mb=budget, fingerprint_check=0.0))


# ------------------------------------------------------------------ what train's own loss pairs

def exact_student(factory: str = "numbered.py:numbered", **train: object) -> kdcache.Pipeline:
    """The numbered pipeline whose student is the teacher itself (``echo``, its one weight 1), trained on mse alone: its
    loss is 0 exactly where every row the step trains on is paired with its own target (and so its gradient, and the
    weight stays 1), and at least 4 / B for a batch of B rows holding one row paired with a neighbour's."""
    return numbered(data={"factory": factory, "split": "train"}, student={"factory": "numbered.py:echo"},
                    train={"epochs": 2, "batch_size": 8, "device": "cpu", "lr": 1e-6, "loss": {"kl": 0.0, "mse": 1.0}, **train})


def epoch_losses(out) -> list[tuple[int, float]]:
    import json

    return [(line["step"], line["loss_mse"]) for line in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


@pytest.mark.parametrize("settings", [{"num_workers": 2}, {"num_workers": 2, "memory_budget_mb": 0.0, "shuffle_buffer_shards": 1},
                                      {"num_workers": 2, "memory_budget_mb": 0.0, "streams": 2}],
                         ids=["memory-workers", "stream-workers", "joined-streams-workers"])
def test_train_pairs_every_row_it_trains_on_with_its_own_target(numbered_store, tmp_path, settings):
    """The pairing as the training step sees it (TransferSet's batches through DataLoader workers, streamed buffers and
    joined streams, then the student and the loss), not as a reader's batch shows it: a student that is the teacher
    trains at loss 0 in every epoch, and the same run on a dataset with two items exchanged, its checks switched off,
    does not (what a pairing slip anywhere from the store to the loss would show)."""
    kdcache.train(exact_student(**settings), numbered_store, tmp_path / "run")
    assert [loss for _, loss in epoch_losses(tmp_path / "run")] == [0.0, 0.0]
    swapped = exact_student("numbered.py:numbered_two_swapped", **settings, fingerprint_check=0.0, fingerprint_recheck=0.0)
    kdcache.train(swapped, numbered_store, tmp_path / "swapped")
    # rows 40 and 41 each paired with the other's target: 4 errors of 1 each, 2 / N of the epoch's mean (the weight moves a little)
    assert [loss for _, loss in epoch_losses(tmp_path / "swapped")] == [pytest.approx(2 / N, rel=1e-3)] * 2


@pytest.mark.parametrize("settings, steps", [({}, (13, 17, 26)), ({"memory_budget_mb": 0.0, "streams": 2}, (7, 9, 14))],
                         ids=["memory", "stream-joined-streams"])
def test_a_run_resumed_inside_an_epoch_with_other_workers_pairs_every_row_with_its_own_target(numbered_store, tmp_path, settings, steps):
    """Targets in RAM, or streamed in joined streams, serve the same steps for any number of DataLoader workers, so a resume
    may change it: a run of 2 workers stopped inside its second epoch (train.steps) and resumed by 1 worker trains at loss 0
    to its end (the second epoch's line: the means over its steps before the stop and after the resume)."""
    out, (epoch, stop, end) = tmp_path / "run", steps
    kdcache.train(exact_student(num_workers=2, steps=stop, **settings), numbered_store, out)
    kdcache.train(exact_student(num_workers=1, steps=end, **settings), numbered_store, out, resume=True)
    assert epoch_losses(out) == [(epoch, 0.0), (end, 0.0)]
