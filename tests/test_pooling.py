"""Pooled targets that ignore padding (``targets.mask``): a select's ``mean`` averages each item's valid positions
only, ``last`` takes its last valid one, so a sentence's stored targets do not depend on how it was padded or batched.

The teacher (extract_zoo.TokenBag) computes each token alone, and the datasets (extract_zoo.RepaddedTokens) hold the same
sentences padded to 6, 8 (at the start) or 11 positions: every store of them must hold the same pooled targets.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import extract_zoo as zoo
import kdcache
from conftest import FIXTURES
from kdcache import data, store as layout
from kdcache.cli import main
from kdcache.errors import PipelineError, ShapeMismatchError, StoreError, StoreMismatchError, TargetError
from kdcache.pipeline import from_dict
from kdcache.train import select_student, setup, student_feature
from kdcache.verify import verify

POOLED = {"logits": "mean", "embed": "last"}  # a text model's mean-pooled output, a causal LM's last-token feature


def pooled(dataset: str = "repadded_tokens", mask: str = "attention_mask", select: dict | None = None, batch_size: int = 10,
           student: dict | None = None, train: dict | None = None) -> kdcache.Pipeline:
    """TokenBag over ``dataset``'s 50 items, its logits mean-pooled and its ``embed`` features at the last token (``select``),
    by ``mask``; a student of both (kl on the logits, feature MSE on ``embed``), its sections updated by ``student``, ``train``."""
    return from_dict({"teacher": {"factory": "extract_zoo.py:token_bag"}, "data": {"factory": f"extract_zoo.py:{dataset}"},
                      "targets": {"layers": ["embed"], "dtype": "float32", "select": POOLED if select is None else select, "mask": mask},
                      "extract": {"batch_size": batch_size, "device": "cpu", "rows_per_shard": 20},
                      "student": {"factory": "extract_zoo.py:pooled_student", **(student or {})},
                      "train": {"epochs": 2, "batch_size": 8, "lr": 0.01, "device": "cpu", "loss": {"kl": 1.0},
                                "features": {"embed": {"student": "embed", "weight": 0.5}}, **(train or {})}}, root=FIXTURES)


def student_pooling(dataset: str = "repadded_tokens", mask: str = "attention_mask", select: str = "mean", feature: str = "last",
                    **train) -> kdcache.Pipeline:
    """``pooled``'s, with a student that pools by its selects (extract_zoo.token_bag_student): its logits by ``select``, its
    ``embed`` features by ``feature``; train.mask = ``mask``."""
    return pooled(dataset, student={"factory": "extract_zoo.py:token_bag_student", "select": select},
                  train={"mask": mask, "features": {"embed": {"student": "embed", "weight": 0.5, "select": feature}}, **train})


def stored(location: Path) -> dict[str, np.ndarray]:
    s = layout.open_store(str(location))
    return {name: s.array(t.path)[:] for name, t in s.targets.items()}


def expected() -> dict[str, np.ndarray]:
    """Each sentence's mean logits and last token's features, computed from its tokens alone (no padding)."""
    teacher, items = zoo.token_bag(), zoo.RepaddedTokens()
    with torch.no_grad():
        sentences = [items[i]["tokens"][items[i]["attention_mask"]] for i in range(len(items))]
        return {"logits": np.stack([teacher.head(teacher.embed(s)).mean(0).numpy() for s in sentences]),
                "embed": np.stack([teacher.embed(s)[-1].numpy() for s in sentences])}


@pytest.mark.parametrize(("dataset", "batch_size"), [("repadded_tokens_wide", 7), ("repadded_tokens_left", 16)])
def test_the_same_sentences_padded_and_batched_otherwise_store_the_same_pooled_targets(tmp_path, dataset, batch_size):
    """With targets.mask, the stores of the sentences padded to 6 positions (batches of 10), and to 11 (batches of 7) or at
    the start to 8 (batches of 16), hold the same values: each sentence's own. Without it, mean pooled the pad tokens'
    logits and -1 took a pad token's features (under right padding), which differ with the padding."""
    kdcache.extract(pooled(), tmp_path / "six.zarr")
    kdcache.extract(pooled(dataset, batch_size=batch_size), tmp_path / "other.zarr")
    six, other, own = stored(tmp_path / "six.zarr"), stored(tmp_path / "other.zarr"), expected()
    for name in ("logits", "embed"):
        assert np.array_equal(six[name], other[name])
        np.testing.assert_allclose(six[name], own[name], rtol=1e-6, atol=1e-6)
    unmasked = {"logits": "mean", "embed": "-1"}
    kdcache.extract(pooled(mask="", select=unmasked), tmp_path / "six-unmasked.zarr")
    kdcache.extract(pooled(dataset, mask="", select=unmasked, batch_size=batch_size), tmp_path / "other-unmasked.zarr")
    six, other = stored(tmp_path / "six-unmasked.zarr"), stored(tmp_path / "other-unmasked.zarr")
    padded = np.arange(50) % 3 != 0  # items with padding
    assert not np.allclose(six["logits"][padded], other["logits"][padded])
    np.testing.assert_allclose(six["logits"][~padded], own["logits"][~padded], rtol=1e-6, atol=1e-6)  # unpadded: right either way
    assert not np.allclose(six["embed"][padded], own["embed"][padded])


def test_a_store_pooled_by_a_mask_records_it_shows_it_and_trains(tmp_path):
    """The manifest's targets record the mask where a select pooled by it (FORMAT.md §8), as do info and the dry run;
    verify --teacher-check recomputes the rows with it; a store of the same pipeline without a mask is made as before
    (no "mask" written) and is not resumed by a run with one; the pooled store trains."""
    location = tmp_path / "pooled.zarr"
    kdcache.extract(pooled(), location)
    manifest = layout.open_store(str(location)).manifest
    assert {name: t.get("mask") for name, t in manifest["targets"].items()} == {"logits": "attention_mask", "embed": "attention_mask"}
    assert layout.open_store(str(location)).info()["targets"]["embed"]["mask"] == "attention_mask"
    shown = CliRunner().invoke(main, ["info", str(location)])
    assert shown.exit_code == 0 and "(mean, targets.mask 'attention_mask')" in shown.stdout and "(last, targets.mask 'attention_mask')" in shown.stdout
    assert kdcache.dry_run(pooled())["targets"]["logits"]["mask"] == "attention_mask"
    assert verify(str(location), teacher_check=10, pipeline=pooled())["ok"]
    with pytest.raises(StoreError, match=r"the pipeline pools target 'logits' \(select 'mean'\) with targets.mask = '', the store was "
                                         r"pooled with 'attention_mask'; pass the pipeline the store was extracted with"):
        verify(str(location), teacher_check=10, pipeline=pooled(mask="", select={"logits": "mean", "embed": "-1"}))
    plain = tmp_path / "plain.zarr"
    kdcache.extract(pooled(mask="", select={"logits": "mean", "embed": "-1"}), plain)
    assert all("mask" not in t for t in layout.open_store(str(plain)).manifest["targets"].values())
    with pytest.raises(StoreMismatchError, match=r"different targets \(the store has no targets\.logits\.mask, now 'attention_mask'\)"):
        kdcache.extract(pooled(select={"logits": "mean", "embed": "-1"}), plain)
    result = kdcache.train(pooled(), location, tmp_path / "run")
    assert np.isfinite(result["loss"])
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"loss_kl", "loss_feat:embed"} <= set(lines[-1])


@pytest.mark.parametrize(("dataset", "mask", "select", "error", "match"), [
    ("repadded_tokens", "mask", POOLED, PipelineError, r"^<dict>: targets.mask = 'mask' is not an entry of the dataset's inputs \(their "
                                                       r"keys: \['tokens', 'attention_mask'\]\); name the entry .* or set targets.mask = \"\"$"),
    # "1:" keeps 5 of the 6 positions the mask covers
    ("repadded_tokens", "attention_mask", {"logits": "1:.mean"}, ShapeMismatchError,
     r"^target 'logits': targets.mask 'attention_mask' has 6 positions per item, but step 'mean' pools the sample's first axis of 5 "
     r"entries \(per-sample shape \[5, 12\]\); give the mask one value per entry of that axis .* fix \[targets.select\] 'logits'"),
    # true at padding: item 0 (unpadded) keeps no position
    ("repadded_tokens_inverted", "attention_mask", POOLED, PipelineError,
     r"^<dict>: targets.mask 'attention_mask' keeps no position of item 0 \(its 6 values all false\); it must be true where a "
     r"position counts, .* return ~mask$"),
    ("repadded_tokens", "", {"embed": "last"}, TargetError,
     r"^target 'embed': step 'last' picks each sample's last valid position by its padding mask, and none is given here .* "
     r"set targets.mask = \"attention_mask\" .* \(\"-1\": the last position, padding or not\)$"),
    ("repadded_tokens", "attention_mask", {"embed": "-1"}, PipelineError,
     r"^<dict>: targets.mask = 'attention_mask' pools the select steps 'mean' and 'last', but no target's select has one \(logits "
     r"'tensor', embed '-1'\), so it would change nothing; .* or set targets.mask = \"\""),
], ids=["missing-key", "wrong-shape", "inverted", "last-without-mask", "mask-unused"])
def test_a_mask_that_does_not_fit_is_refused_before_a_store_exists(tmp_path, dataset, mask, select, error, match):
    with pytest.raises(error, match=match):
        kdcache.extract(pooled(dataset, mask, select), tmp_path / "store.zarr")
    assert not (tmp_path / "store.zarr").exists()


def test_an_item_with_no_valid_position_later_in_the_run_is_refused(tmp_path):
    """Item 23 is all padding, in the run's third batch (the probe batch is items 0-9): its mean would be 0/0."""
    with pytest.raises(PipelineError, match=r"^<dict>: targets.mask 'attention_mask' keeps no position of item 23 \(its 6 values all "
                                            r"false\)"):
        kdcache.extract(pooled("repadded_tokens_empty"), tmp_path / "store.zarr")


def student_outputs(location: Path, dataset: str, batches: list[list[int]]) -> dict[str, np.ndarray]:
    """The pooled logits and ``embed`` features (``student_pooling``'s selects, by train.mask) of a freshly set up student
    for ``dataset``'s items in ``batches``, by item."""
    pipeline = student_pooling(dataset)
    items = data.load(pipeline, "train")
    run = setup(pipeline, layout.open_store(str(location)), items, torch.device("cpu"))
    out: dict[str, dict[int, np.ndarray]] = {"logits": {}, "embed": {}}
    for rows in batches:
        batch = data.collate(data.Indexed(items, None).__getitems__(rows))
        run.hooked.clear()
        with torch.no_grad():
            padding = run.padding(batch)
            logits = select_student(data.call(run.student, batch["inputs"], "student"), "student output", run.select, mask=padding)
            embed = student_feature(run.hooked, "embed", "embed", "last", padding)
        for i, row in enumerate(rows):
            out["logits"][row], out["embed"][row] = logits[i].numpy(), embed[i].numpy()
    return {name: np.stack([by_row[i] for i in range(10)]) for name, by_row in out.items()}


def test_a_student_pooled_by_train_mask_gives_a_sentence_the_same_output_whatever_its_padding_and_batch(tmp_path):
    """student.select = "mean" and a train.features select "last" pool the student's per-token outputs by train.mask, as
    targets.mask pools the teacher's: the sentences padded to 6 positions in one batch, to 11 in reverse order, and at the
    start to 8 in two interleaved batches, give each sentence the same values, those of its tokens alone. Before, the
    student's mean averaged the pad tokens and its last was refused."""
    kdcache.extract(pooled(), tmp_path / "six.zarr")
    six = student_outputs(tmp_path / "six.zarr", "repadded_tokens", [list(range(10))])
    wide = student_outputs(tmp_path / "six.zarr", "repadded_tokens_wide", [list(range(9, -1, -1))])
    left = student_outputs(tmp_path / "six.zarr", "repadded_tokens_left", [list(range(0, 10, 2)), list(range(1, 10, 2))])
    student, items = zoo.token_bag_student(), zoo.RepaddedTokens()
    with torch.no_grad():
        sentences = [items[i]["tokens"][items[i]["attention_mask"]] for i in range(10)]
        alone = {"logits": np.stack([student.head(student.embed(s)).mean(0).numpy() for s in sentences]),
                 "embed": np.stack([student.embed(s)[-1].numpy() for s in sentences])}
    for name in ("logits", "embed"):
        assert np.array_equal(six[name], wide[name]) and np.array_equal(six[name], left[name])
        np.testing.assert_allclose(six[name], alone[name], rtol=1e-6, atol=1e-6)


def test_a_pooled_student_trains_alike_on_the_sentences_padded_otherwise_with_streams_and_shuffling(tmp_path):
    """Two streams of shuffled rows, batches of 6: each batch's train.mask is its own rows' (the same sentences padded at the
    end to 6 positions or at the start to 8 train the same losses and weights, where another row's mask would pool other
    tokens of the two layouts); the evaluation (eval_agreement with the stored logits) pools the student's output alike."""
    runs = {}
    for name, dataset in (("right", "repadded_tokens"), ("left", "repadded_tokens_left")):
        kdcache.extract(pooled(dataset), tmp_path / f"{name}.zarr")
        pipeline = student_pooling(dataset, batch_size=6, streams=2, shuffle_buffer_shards=2, eval_cache=str(tmp_path / f"{name}.zarr"),
                                   eval_split="train")
        kdcache.train(pipeline, tmp_path / f"{name}.zarr", tmp_path / name)
        lines = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        runs[name] = ([[line[k] for k in ("loss", "loss_kl", "loss_feat:embed", "eval_agreement")] for line in lines if "loss_kl" in line],
                      torch.load(tmp_path / name / "student.pt"))
    (right, right_weights), (left, left_weights) = runs["right"], runs["left"]
    assert len(right) == 2 and np.all(np.isfinite(right))
    np.testing.assert_allclose(right, left, rtol=1e-5)
    for key, value in right_weights.items():
        torch.testing.assert_close(value, left_weights[key], rtol=1e-5, atol=1e-6)


UNMASKED = {"logits": "mean", "embed": "-1"}  # a store pooled over every position (targets.mask = "")


@pytest.mark.parametrize(("stored", "pipeline", "match"), [
    (POOLED, student_pooling(mask="", select="0"),
     r"^<dict>: train.features.'embed'.select = 'last' takes each item's last valid position by the padding mask train.mask names, "
     r"but train.mask is not set; set train.mask = \"attention_mask\" .* or use \"-1\" there"),
    (UNMASKED, student_pooling(feature="-1"),
     r"^<dict>: student.select = 'mean' pools the student's output by train.mask 'attention_mask' \(each item's valid positions\), but "
     r"the stored target 'logits' \(targets.select 'mean'\) was pooled over every position, padding included \(the store records no "
     r"targets.logits.mask\): the two differ for every padded item; extract the store with targets.mask = 'attention_mask', or set "
     r"train.mask = \"\""),
    (POOLED, student_pooling(mask="", feature="-1"),
     r"^<dict>: student.select = 'mean' averages the student's output over every position, padding included \(train.mask is not "
     r"set\), but the stored target 'logits' \(targets.select 'mean'\) was pooled by the padding mask 'attention_mask' "
     r"\(targets.logits.mask\): .* set train.mask to the key of the items' padding mask \(the store's: 'attention_mask'\)$"),
], ids=["last-without-train-mask", "student-masked-store-not", "store-masked-student-not"])
def test_a_student_pooled_otherwise_than_its_targets_is_refused_before_training(tmp_path, stored, pipeline, match):
    kdcache.extract(pooled(mask="attention_mask" if stored is POOLED else "", select=stored), tmp_path / "store.zarr")
    with pytest.raises(PipelineError, match=match):
        kdcache.train(pipeline, tmp_path / "store.zarr", tmp_path / "run")
    assert not (tmp_path / "run" / "student.pt").exists()


def test_a_student_pooled_where_its_target_is_not_trains_and_the_dry_run_warns_of_a_mismatch(tmp_path):
    """A pooling step on the student's side alone is a choice (its mean-pooled features against the teacher's last position,
    "-1", of a store pooled by no mask): trained, the mask pooling it. The dry run says what train would refuse."""
    kdcache.extract(pooled(mask="", select=UNMASKED), tmp_path / "store.zarr")
    result = kdcache.train(student_pooling(select="0", feature="mean"), tmp_path / "store.zarr", tmp_path / "run")
    assert np.isfinite(result["loss"])
    warnings = kdcache.dry_run(pooled(student={"factory": "extract_zoo.py:token_bag_student", "select": "mean"}))["warnings"]
    assert any("kdcache train would refuse this store: <dict>: student.select = 'mean' averages the student's output" in w for w in warnings)


def test_the_dry_run_warns_of_a_student_last_with_no_mask_anywhere(tmp_path):
    """student.select = "last" with neither train.mask nor targets.mask set is refused by train; the dry run said nothing of
    it, since it checked the student's selects only where a mask was set."""
    pipeline = pooled(mask="", select=UNMASKED, student={"factory": "extract_zoo.py:token_bag_student", "select": "last"})
    said = (r"<dict>: student.select = 'last' takes each item's last valid position by the padding mask train.mask names, but "
            r"train.mask is not set; set train.mask = \"attention_mask\"")
    warnings = kdcache.dry_run(pipeline)["warnings"]
    assert any(re.match("kdcache train would refuse this store: " + said, w) for w in warnings), warnings
    kdcache.extract(pipeline, tmp_path / "store.zarr")
    with pytest.raises(PipelineError, match="^" + said):
        kdcache.train(pipeline, tmp_path / "store.zarr", tmp_path / "run")


def test_a_student_last_given_no_mask_names_train_mask_not_targets_mask():
    """select_student and student_feature (the student's selects) with a "last" step and no mask told the user to set
    targets.mask, extract's setting, which does not pool the student's outputs; they now name train.mask."""
    output = torch.randn(2, 5, 12)
    with pytest.raises(TargetError, match=r"^the student output: step 'last' picks each sample's last valid position by its padding "
                                          r"mask, and none is given here \(the student's selects pool by train.mask\); set train.mask = "
                                          r"\"attention_mask\" .* or fix student.select \(\"-1\""):
        select_student(output, "student output", "last")
    with pytest.raises(TargetError, match=r"^train.features 'embed': student module 'embed': step 'last' .* set train.mask = .* "
                                          r"fix train.features.'embed'.select"):
        student_feature({"embed": output}, "embed", "embed", "last")


def per_sample_mean(value: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The masked mean as it was: one ``mean`` per sample over its valid positions (the reference for values and gradients)."""
    return torch.stack([item[keep.to(value.device)].mean(dim=0) for item, keep in zip(value.unbind(0), valid)])


def padded(sentences: list[torch.Tensor], width: int, left: bool = False, holes: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``sentences`` ((L, ...) each) in one batch of ``width`` positions, right or ``left`` padded, or spread over every
    other position (``holes``: a mask with gaps); the padding holds NaN and inf (a model's outputs there are not zero, and
    the batched reduction reads them before zeroing them)."""
    value, valid = torch.full((len(sentences), width, *sentences[0].shape[1:]), float("nan"), dtype=sentences[0].dtype), \
        torch.zeros(len(sentences), width, dtype=torch.bool)
    value[:, 1::3] = float("inf")
    for i, s in enumerate(sentences):
        at = torch.arange(len(s)) * 2 if holes else torch.arange(width - len(s), width) if left else torch.arange(len(s))
        value[i, at], valid[i, at] = s, True
    return value, valid


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])  # -0.0 differs from 0.0 here


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_a_masked_mean_gives_each_sentence_the_same_bits_whatever_its_padding_batch_and_neighbours(dtype):
    """teacher._valid_mean (targets.mask's and train.mask's ``mean``) reduces the whole batch at once: each sentence's mean is
    the same bits alone, right padded to 40 or 97 positions, left padded, with gaps in its mask, in batches of 3 or 12 in
    another order; within rounding of a mean of its positions alone. All -0.0 values give +0.0 however padded."""
    from kdcache.teacher import _valid_mean

    g = torch.Generator().manual_seed(0)
    lengths = [1, 2, 3, 5, 8, 13, 16, 17, 31, 32, 33, 40]
    sentences = [torch.randn(n, 4, 3, generator=g).to(dtype) * 10 for n in lengths]
    sentences[0] = torch.full((1, 4, 3), -0.0, dtype=dtype)
    sentences[3][:, 0] = -0.0
    alone = [_valid_mean(s[None], torch.ones(1, len(s), dtype=torch.bool))[0] for s in sentences]
    for width, left, holes, order in [(40, False, False, range(12)), (97, False, False, range(11, -1, -1)), (40, True, False, range(12)),
                                      (80, False, True, [5, 0, 11, 3, 7, 1, 9, 2, 10, 4, 8, 6])]:
        order = list(order)
        for group in (order, order[:3], order[3:]):
            value, valid = padded([sentences[i] for i in group], width, left, holes)
            pooled = _valid_mean(value, valid)
            assert pooled.dtype == dtype and pooled.shape == (len(group), 4, 3)
            for row, i in enumerate(group):
                assert torch.equal(bits(pooled[row]), bits(alone[i])), (width, left, holes, i)
    for s, mean in zip(sentences, alone):
        torch.testing.assert_close(mean.double(), s.double().mean(dim=0), rtol=1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-6,
                                   atol=1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-6)
    assert torch.equal(bits(alone[0]), bits(torch.zeros(4, 3, dtype=dtype)))


def test_a_masked_mean_passes_the_gradients_a_mean_per_sample_does():
    """The batched reduction's backward gives each valid position the upstream gradient / its sample's length and the padding
    zero, as the per-sample means did: the same bits."""
    from kdcache.teacher import _valid_mean

    g = torch.Generator().manual_seed(1)
    valid = torch.rand(9, 23, generator=g) < 0.6
    valid[:, 4] = True
    valid[2] = torch.arange(23) >= 20  # left padded
    upstream = torch.randn(9, 5, generator=g)
    grads = []
    for pool in (_valid_mean, per_sample_mean):
        value = torch.randn(9, 23, 5, generator=torch.Generator().manual_seed(2), requires_grad=True)
        pooled = pool(value, valid)
        torch.testing.assert_close(pooled, per_sample_mean(value.detach(), valid), rtol=1e-6, atol=1e-6)
        pooled.backward(upstream)
        grads.append(value.grad)
    assert torch.equal(grads[0], grads[1])
    assert not grads[0][~valid].any()


def test_a_masked_mean_runs_as_many_ops_for_a_batch_of_256_as_for_one_of_4():
    """The masked mean ran one reduction per sample (a ``mean`` forward, four ops backward, a Python iteration each): on a
    GPU ~1,000 kernel launches for a batch of 256, most of a small student's step; through ``value[i]`` its backward was
    quadratic in the batch too, 6.4 s a step at 256 x 128 x 256). Counted as aten ops dispatched in the forward and
    backward, deterministic where a timing would not be: the same for 4 samples as for 256."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from kdcache.teacher import _valid_mean

    class Count(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.ops += 1
            return func(*args, **(kwargs or {}))

    def ops(batch: int) -> int:
        value = torch.randn(batch, 64, 8, requires_grad=True)
        valid = torch.arange(64) < torch.randint(1, 65, (batch, 1), generator=torch.Generator().manual_seed(batch))
        valid[0] = True  # the longest sample fills the 64 positions: the same tree depth for both batches
        Count.ops = 0
        with Count():
            _valid_mean(value, valid).sum().backward()
        return Count.ops

    small, large = ops(4), ops(256)
    assert large == small, f"{large} ops for 256 samples, {small} for 4"


PEAK = """
import resource, sys, torch
from kdcache.teacher import _valid_mean
torch.set_num_threads(1)
batch, positions, width = 2, 3000, 4096
value = torch.randn(batch, positions, width, dtype=torch.float16)  # an fp16 LM's hidden states, T not a power of two
valid = torch.arange(positions) < torch.tensor([[positions], [positions - 700]])  # right padding: the view path
_valid_mean(value[:, :8], valid[:, :8])  # kernels loaded, the allocator warm
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with torch.no_grad():
    _valid_mean(value, valid)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024 / (value.numel() * 4))
"""


def test_a_masked_mean_of_fp16_hidden_states_makes_one_float32_copy_of_them():
    """Extract's masked mean (no gradients) held three float32 temporaries of an fp16 B x T x D at once: the conversion,
    ``torch.where``'s output and the tree's padding to a power of two of positions (4,096 for T = 3,000): 2.4x the float32
    size at its peak, 4.7x the hidden states' own. Now one buffer, summed in place. Peak RSS of a fresh process, in units
    of one float32 copy (98 MB here): under 1.3 (old code 2.37)."""
    import subprocess
    import sys

    peak = float(subprocess.run([sys.executable, "-c", PEAK], capture_output=True, text=True, check=True).stdout)
    assert peak < 1.3, f"{peak:.2f} float32 copies of the hidden states at the peak"
