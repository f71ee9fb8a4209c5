"""Top-k logits (``targets.topk``): the store keeps each position's K largest logits, descending, and their classes
(int32, ``targets/logits_indices``); training distils against them (``losses.topk_kl_divergence``, on the K stored classes). Real stores on disk,
tiny seeded teachers: ``topk_zoo``'s peaked logits over ``extract_zoo.images`` (whose first pixel is the index), and the
text example's per-token LM (pipelines/text.py)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from torch.utils._python_dispatch import TorchDispatchMode

import kdcache
from kdcache import store as layout
from kdcache.cli import main
from kdcache.errors import PipelineError
from kdcache.pipeline import from_dict, resolve
from kdcache.verify import verify

FIXTURES = Path(__file__).resolve().parent / "fixtures"
TEXT = Path(__file__).resolve().parent.parent / "pipelines" / "text.toml"
PEAKED = {
    "teacher": {"factory": "topk_zoo.py:peaked"},
    "data": {"factory": "extract_zoo.py:images", "split": "train"},
    "targets": {"logits": True, "dtype": "float16", "topk": 3},
    "extract": {"batch_size": 8, "device": "cpu", "rows_per_shard": 16},
    "student": {"factory": "topk_zoo.py:student"},
    "train": {"epochs": 1, "batch_size": 8, "device": "cpu", "loss": {"kl": 1.0, "temperature": 1.0}},
}


def peaked(**sections: dict) -> kdcache.Pipeline:
    raw = {k: dict(v) for k, v in PEAKED.items()}
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values}
    return from_dict(raw, root=FIXTURES)


def peaked_top3(i: int) -> list[int]:
    """The stored classes of sample i: its peak i % 16, then the classes beside it (both -1: the lower first), then the next."""
    p = i % 16
    return [p, 1, 2] if p == 0 else [p, 14, 13] if p == 15 else [p, p - 1, p + 1]


@pytest.fixture(scope="module")
def text_store(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("topk") / "text.zarr"
    kdcache.extract(kdcache.load_pipeline(TEXT, ["targets.topk=8", "extract.device=cpu"]), str(out))
    return str(out)


def test_a_text_store_keeps_the_teachers_topk_logits_and_classes_readable_by_plain_zarr(text_store):
    """The values and classes are torch.topk's of the teacher's logits as stored (float16), every position, ties in class
    order; plain zarr reads both arrays and the manifest says K and the class count (format version 2)."""
    import text

    g = zarr.open_group(text_store, mode="r", zarr_format=3)
    m = g.attrs["kdcache"]
    assert m["format_version"] == 2
    assert {k: m["targets"]["logits"][k] for k in ("path", "shape", "topk", "classes")} == {
        "path": "targets/logits", "shape": [24, 8], "topk": 8, "classes": 64}
    values, classes = g["targets/logits"][:], g["targets/logits_indices"][:]
    assert values.shape == classes.shape == (192, 24, 8) and values.dtype == np.float16 and classes.dtype == np.int32
    data = text.dataset("train")
    batch = {k: torch.stack([data[i][k] for i in range(len(data))]) for k in ("input_ids", "attention_mask")}
    with torch.inference_mode():
        logits = text.teacher()(**batch).to(torch.float16)  # (192, 24, 64) as a full-logits store would hold them
    np.testing.assert_array_equal(values, logits.topk(8, dim=-1).values.numpy())
    np.testing.assert_array_equal(np.take_along_axis(logits.numpy(), classes.astype(np.int64), -1), values)
    tied = values[..., 1:] == values[..., :-1]
    assert (classes[..., 1:][tied] > classes[..., :-1][tied]).all()
    info = kdcache.open_store(text_store).info()["targets"]["logits"]
    assert (info["bytes_per_sample_full"], info["bytes_per_sample_saved"]) == (24 * 64 * 2, 24 * 64 * 2 - 24 * 8 * (2 + 4))


def test_topk_ties_are_broken_by_class_whatever_the_batch():
    """Equal values: the lower class first, and where they straddle the K-th place the lower classes are kept; a row's
    result does not depend on the rows batched with it."""
    from kdcache.teacher import top_k

    row = torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0, 0.0, 3.0])
    values, classes = top_k(row[None], 3)
    assert values.tolist() == [[3.0, 3.0, 3.0]] and classes.tolist() == [[1, 2, 4]] and classes.dtype == torch.int32
    many = torch.randn(40, 7).round()  # many ties
    many[17] = row
    assert top_k(many, 3)[1][17].tolist() == [1, 2, 4]
    for k in (1, 4, 7):
        v, c = top_k(many, k)
        for r in range(40):
            want = sorted(range(7), key=lambda j: (-float(many[r, j]), j))[:k]
            assert c[r].tolist() == want and v[r].tolist() == many[r, want].tolist()


def test_topk_classes_follow_their_samples_through_a_shuffled_streamed_epoch(tmp_path):
    """Each served row's stored classes are its own sample's (the peak at index % 16), read in RAM or streamed shard by
    shard in shuffled order; verify, with --teacher-check, passes."""
    out = str(tmp_path / "peaked.zarr")
    kdcache.extract(peaked(), out)
    store = kdcache.open_store(out)
    assert store.paths() == [layout.INDEX, layout.FINGERPRINT, layout.LABEL, layout.LOGITS, layout.LOGITS_INDICES]
    dataset = resolve("extract_zoo.py:images", FIXTURES)("train")
    for budget in (2048.0, 0.0):
        transfer = kdcache.TransferSet(out, dataset, ["logits"], batch_size=8, seed=3, memory_budget_mb=budget, buffer_shards=2)
        transfer.set_epoch(0)
        seen = []
        for batch in transfer:
            index = batch["index"].tolist()
            assert batch["targets"][layout.LOGITS_INDICES].tolist() == [peaked_top3(i) for i in index]
            assert batch["targets"][layout.LOGITS][:, 0].tolist() == [0.0] * len(index)
            seen += index
        assert sorted(seen) == list(range(50)) and seen != sorted(seen)
    report = verify(out, teacher_check=10, pipeline=peaked())
    assert report["ok"], report


def test_an_interrupted_topk_extract_resumes_to_the_uninterrupted_store(tmp_path, zoo_env):
    out, reference = str(tmp_path / "resumed.zarr"), str(tmp_path / "reference.zarr")
    zoo_env(FAIL_AT=42)
    with pytest.raises(kdcache.KdcacheError, match="simulated crash"):
        kdcache.extract(peaked(), out)
    assert kdcache.open_store(out).done().tolist() == [True, True, False, False]
    zoo_env(FAIL_AT=None)
    kdcache.extract(peaked(extract={"batch_size": 5}), out)
    kdcache.extract(peaked(), reference)
    a, b = zarr.open_group(out, mode="r"), zarr.open_group(reference, mode="r")
    for path in (layout.LOGITS, layout.LOGITS_INDICES, layout.DIGEST):
        np.testing.assert_array_equal(a[path][:], b[path][:], err_msg=path)
    assert verify(out)["ok"]


def rewrite_classes(out: str, classes: np.ndarray, path: str = layout.LOGITS_INDICES) -> None:
    """Write ``classes`` over the store's top-k classes (or the array at ``path``), with shard 1's digest made again for
    them (as a writer that computed them so would)."""
    g = zarr.open_group(out, mode="r+")
    g[path][:] = classes
    column = kdcache.open_store(out).digest_paths().index(path)
    g[layout.DIGEST][1, column] = layout.shard_digest(path, 1, [classes[16:32]])


def test_verify_teacher_check_names_a_stored_class_that_is_not_the_teachers(tmp_path):
    """Two tied classes swapped hold the teacher's values still (ties may order either way on another device); the peak's
    class replaced by another does not."""
    out = str(tmp_path / "peaked.zarr")
    kdcache.extract(peaked(), out)
    classes = zarr.open_group(out, mode="r")[layout.LOGITS_INDICES][:]
    classes[20, [1, 2]] = classes[20, [2, 1]]
    rewrite_classes(out, classes)
    assert verify(out, teacher_check=50, pipeline=peaked())["ok"]
    classes[20, 0] = 7
    rewrite_classes(out, classes)
    report = verify(out, teacher_check=50, pipeline=peaked())
    teacher = {c["name"]: c for c in report["checks"]}["teacher"]
    assert not report["ok"] and teacher["problems"] == [
        "target 'logits': 1 values beyond tolerance (rtol 0.01); worst at row 20: stored -0, recomputed -3"]


@pytest.mark.parametrize("topk", [0, 2])
def test_verify_teacher_check_of_a_topk_store_takes_a_pipeline_of_another_targets_topk(peaked_store, topk):
    """The teacher's output is recomputed whole and compared as the store holds it (its own K), so the pipeline's
    targets.topk does not matter: a pipeline without it (the store made with --set targets.topk=3) was refused as a
    target of another shape ([16] against [3]), though only the stored K differed."""
    assert verify(peaked_store, teacher_check=20, pipeline=peaked(targets={"topk": topk}))["ok"]


def test_verify_teacher_check_of_a_full_logits_store_takes_a_pipeline_of_topk(tmp_path):
    out = str(tmp_path / "full.zarr")
    kdcache.extract(peaked(targets={"topk": 0}), out)
    assert verify(out, teacher_check=20, pipeline=peaked())["ok"]


@pytest.mark.parametrize("path, row, match", [
    (layout.LOGITS_INDICES, [3, 2, 16], "targets/logits_indices: shard 1: a class outside the manifest's 16 classes (first row 20: class 16)"),
    (layout.LOGITS_INDICES, [3, -1, 4], "targets/logits_indices: shard 1: a class outside the manifest's 16 classes (first row 20: class -1)"),
    (layout.LOGITS_INDICES, [3, 2, 2], "targets/logits_indices: shard 1: a class repeated within a position at 1 positions (first row 20)"),
    (layout.LOGITS, [-1.0, 0.0, -1.0], "targets/logits: shard 1: top-k values not in descending order at 1 positions (first row 20)"),
])
def test_plain_verify_names_topk_rows_that_break_the_format(peaked_store, tmp_path, path, row, match):
    """FORMAT.md §5.1 (a hand-made store, its digests made for what it holds): classes in [0, C), distinct per position,
    values descending. Plain verify passed all three (--teacher-check named the range alone, and passed a repeated tied
    class: kl counted it twice); training refuses classes out of range or repeated (next test), and HDF5 import refuses the same rows."""
    from kdcache.interop import export_hdf5, import_hdf5

    out = str(tmp_path / "hand.zarr")
    shutil.copytree(peaked_store, out)
    rows = zarr.open_group(out, mode="r")[path][:]
    rows[20] = row
    rewrite_classes(out, rows, path)
    report = verify(out)
    assert not report["ok"] and {c["name"]: c for c in report["checks"]}["values"]["problems"] == [match]
    export_hdf5(out, tmp_path / "hand.h5")
    with pytest.raises(kdcache.KdcacheError, match=re.escape(f"dataset '{path}' rows 16-31 hold {match.split(': ', 2)[2]}")):
        import_hdf5(tmp_path / "hand.h5", str(tmp_path / "back.zarr"))


@pytest.mark.parametrize("row, seen", [([3, 2, 16], 16), ([3, -1, 4], -1)])
def test_verify_teacher_check_names_a_stored_class_outside_the_class_count(peaked_store, tmp_path, row, seen):
    """The teacher check compares the stored top-k values with the fresh logits at the stored classes: a class outside
    [0, C) (a hand-made store whose digests match) is named, not an index error in the gather."""
    out = str(tmp_path / "hand.zarr")
    shutil.copytree(peaked_store, out)
    classes = zarr.open_group(out, mode="r")[layout.LOGITS_INDICES][:]
    classes[20] = row
    rewrite_classes(out, classes)
    report = verify(out, teacher_check=50, pipeline=peaked())
    assert not report["ok"] and {c["name"]: c for c in report["checks"]}["teacher"]["problems"] == [
        f"target 'logits': targets/logits_indices holds class {seen}, outside the 16 classes of the manifest"]


@pytest.mark.parametrize("row, match", [
    ([3, 2, 16], "stored classes run from 0 to 16, outside the 16 classes"),
    ([3, 2, 2], "a class repeated within a position at 1 positions"),
])
def test_training_names_topk_classes_that_break_the_format(peaked_store, tmp_path, row, match):
    """A hand-made store whose digests match what it holds: a class out of range failed in the gather, a repeated one
    (a tie stored twice) trained with that class's probability counted twice."""
    out = str(tmp_path / "hand.zarr")
    shutil.copytree(peaked_store, out)
    classes = zarr.open_group(out, mode="r")[layout.LOGITS_INDICES][:]
    classes[20] = row
    rewrite_classes(out, classes)
    with pytest.raises(kdcache.KdcacheError, match=re.escape(f"the store's top-k logits: {match}")) as e:
        kdcache.train(peaked(), out, tmp_path / "run")
    assert "\n" not in str(e.value) and "kdcache verify names" in str(e.value)


@pytest.mark.parametrize("sections, match", [
    ({"targets": {"topk": 17}}, r"^.*targets.topk = 17 is more than the 16 classes of the logits \(per-sample shape \[16\]\); use at most 16"),
    ({"targets": {"topk": 2, "select": {"logits": "0"}}}, r"targets.topk = 2 .* one value per sample .*targets.topk = 0"),
    ({"targets": {"topk": 2, "select": {"logits": "0:8"}}}, r"targets.topk = 2 .* applies step '0:8' to that axis"),
    ({"teacher": {"factory": "topk_zoo.py:per_token"}, "targets": {"topk": 2, "select": {"logits": "transpose"}}},
     r"applies step 'transpose' to that axis"),
    ({"targets": {"topk": 2, "logits": False, "layers": ["scale"]}}, r"targets.topk = 2 keeps the largest logits, but targets.logits = false"),
])
def test_topk_that_cannot_apply_is_refused_at_setup_in_one_line(sections, match, tmp_path):
    with pytest.raises(PipelineError, match=match) as e:
        kdcache.dry_run(peaked(**sections))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "x.zarr").exists()


def test_dry_run_and_info_show_k_and_the_bytes_saved(tmp_path):
    result = CliRunner().invoke(main, ["extract", str(FIXTURES / "tiny.toml"), "--dry-run", "--set", "targets.topk=2",
                                       "--set", "targets.layers=[]"])
    assert result.exit_code == 0, result.output
    assert "top 2 of 4 classes, their classes in targets/logits_indices: 12 B/sample, the full logits 8 B" in result.output
    out = str(tmp_path / "peaked.zarr")
    kdcache.extract(peaked(), out)
    result = CliRunner().invoke(main, ["info", out])
    assert "v2" in result.output and "top 3 of 16 classes" in result.output and "(14 B saved, 1.8x less)" in result.output
    info = json.loads(CliRunner().invoke(main, ["info", out, "--json"]).output)["targets"]["logits"]
    assert (info["topk"], info["classes"], info["indices_path"]) == (3, 16, "targets/logits_indices")


# -- training --------------------------------------------------------------------------------------------------------


def reference_topk_kl(student: torch.Tensor, values: torch.Tensor, classes: torch.Tensor, t: float,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """The definition, in plain torch: p over the K stored classes, log q over all classes gathered there, KL(p || q) T²,
    averaged over positions (with a mask: each row over its valid positions, then over rows)."""
    log_p = torch.log_softmax(values.double() / t, -1)
    log_q = torch.log_softmax(student.double() / t, -1).gather(-1, classes.long())
    per_position = (log_p.exp() * (log_p - log_q)).sum(-1) * t * t
    if mask is None:
        return per_position.mean()
    m = mask.double()
    return ((per_position * m).sum(1) / m.sum(1)).mean()


@pytest.mark.parametrize("shape, k, t", [((6, 10), 3, 2.0), ((4, 5, 12), 4, 1.0), ((3, 7, 40), 1, 4.0)])
def test_kl_against_topk_logits_is_the_definition(shape, k, t):
    from kdcache import losses

    g = torch.Generator().manual_seed(sum(shape) + k)
    student, teacher = torch.randn(shape, generator=g) * 3, (torch.randn(shape, generator=g) * 3).half()
    values, classes = teacher.topk(k, dim=-1)
    mask = (torch.rand(shape[:2], generator=g) > 0.3) if len(shape) == 3 else None
    if mask is not None:
        mask[:, 0] = True
    want = reference_topk_kl(student, values, classes, t, mask)
    got = losses.kl_divergence(student, losses.topk_logits(values, classes.int(), shape[-1]), t, mask)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    student.requires_grad_(True)
    sparse = losses.topk_kl_divergence(student, values, classes.int(), t, mask)  # what train runs: (B, ..., K) on the teacher's side
    torch.testing.assert_close(sparse.double(), want, rtol=1e-5, atol=1e-6)
    grad, = torch.autograd.grad(sparse, student)
    want_grad, = torch.autograd.grad(reference_topk_kl(student, values, classes, t, mask), student)
    torch.testing.assert_close(grad, want_grad.to(grad.dtype), rtol=1e-4, atol=1e-6)


def test_kl_against_every_class_as_topk_is_exactly_the_full_logits_kl():
    from kdcache import losses
    from kdcache.teacher import top_k

    g = torch.Generator().manual_seed(5)
    student, teacher = torch.randn(3, 6, 50, generator=g), (torch.randn(3, 6, 50, generator=g) * 2).half()
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    values, classes = top_k(teacher, 50)
    for m in (None, mask):
        full = losses.kl_divergence(student, teacher, 3.0, m)
        assert torch.equal(losses.kl_divergence(student, losses.topk_logits(values, classes, 50), 3.0, m), full)
        assert torch.equal(losses.topk_kl_divergence(student, values, classes, 3.0, m), full)


@pytest.mark.parametrize("shape, k", [((64, 10), 3), ((8, 6, 12), 4), ((16, 5), 5), ((32, 9), 1)])
def test_top1_metrics_of_topk_logits_equal_those_of_them_spread_over_the_classes(shape, k):
    """Evaluation scores a student against a top-k store's logits as stored, (B, ..., K) (losses.topk_top1_matches,
    topk_top1_correct), never spreading them over the C classes (a language model's vocabulary per token): equal to the
    full-logits rules on topk_logits' spread, ties within the stored values and in the student's (coarse values), NaN
    rows and labels outside [0, C) included."""
    from kdcache import losses
    from kdcache.teacher import top_k

    g = torch.Generator().manual_seed(sum(shape) + k)
    student = torch.randint(0, 3, shape, generator=g).float()  # ties at the top in most positions
    student.view(-1, shape[-1])[0] = float("nan")
    values, classes = top_k(torch.randint(0, 4, shape, generator=g).half(), k)
    spread = losses.topk_logits(values, classes, shape[-1])
    labels = torch.randint(-1, shape[-1] + 1, shape[:-1], generator=g)
    assert torch.equal(losses.topk_top1_matches(student, values, classes, shape[-1]), losses.top1_matches(student, spread))
    assert torch.equal(losses.topk_top1_correct(values, classes, labels), losses.top1_correct(spread, labels))
    assert 0 < float(losses.topk_top1_matches(student, values, classes, shape[-1]).sum()) < student[..., 0].numel()


def test_topk_top1_matches_refuses_what_the_spread_logits_would():
    from kdcache import losses
    from kdcache.errors import ShapeMismatchError

    values, classes = torch.zeros(2, 3), torch.tensor([[0, 1, 2], [2, 3, 4]])
    with pytest.raises(ShapeMismatchError, match=r"student shape \(2, 6\) does not match teacher shape \(2, 8\); make the "
                                                 r"student's output layer produce 8 classes"):
        losses.topk_top1_matches(torch.zeros(2, 6), values, classes, 8)
    with pytest.raises(ShapeMismatchError, match=r"stored classes run from 0 to 9, outside the 8 classes"):
        losses.topk_top1_matches(torch.zeros(2, 8), values, torch.tensor([[0, 1, 9], [2, 3, 4]]), 8)


def test_topk_logits_refuses_classes_outside_the_class_count():
    from kdcache import losses
    from kdcache.errors import ShapeMismatchError

    with pytest.raises(ShapeMismatchError, match="stored classes run from 0 to 9, outside the 8 classes"):
        losses.topk_logits(torch.zeros(2, 3), torch.tensor([[0, 1, 9], [2, 3, 4]]), 8)
    with pytest.raises(ShapeMismatchError, match=r"student shape \(2, 2\) does not fit the teacher's top-k values \(2, 3\)"):
        losses.topk_kl_divergence(torch.zeros(2, 2), torch.zeros(2, 3), torch.tensor([[0, 1, 2], [2, 3, 4]]))


@pytest.mark.parametrize("t", [0.0, -1.0, float("nan"), float("inf"), "2"])
def test_topk_kl_divergence_refuses_a_bad_temperature(t):
    from kdcache import losses

    with pytest.raises(ValueError, match=rf"topk_kl_divergence: temperature must be a finite number > 0, got {re.escape(repr(t))}; use e.g. 1.0"):
        losses.topk_kl_divergence(torch.zeros(2, 8), torch.zeros(2, 3), torch.tensor([[0, 1, 2], [2, 3, 4]]), t)


@pytest.mark.parametrize(("values", "classes"), [((2, 3), (2, 4)), ((3,), (3,))])
def test_topk_kl_divergence_refuses_values_and_classes_of_other_shapes(values, classes):
    """The top-k values and their classes are one (B, ..., K) shape: a batch's targets.logits and targets.logits_indices."""
    from kdcache import losses
    from kdcache.errors import ShapeMismatchError

    with pytest.raises(ShapeMismatchError, match=rf"topk_kl_divergence: values {re.escape(str(values))} and classes "
                                                  rf"{re.escape(str(classes))} must be one shape \(B, \.\.\., K\)"):
        losses.topk_kl_divergence(torch.zeros(2, 8), torch.zeros(values), torch.zeros(classes, dtype=torch.int64))


class Made(TorchDispatchMode):
    """Counts the bytes of every new tensor the ops run under it make: a view's and an in-place op's output is memory
    made before."""

    nbytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view and not func._schema.is_mutable:
            Made.nbytes += sum(t.nbytes for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor))
        return out


def test_extract_keeps_the_topk_of_the_teachers_logits_without_copying_them_whole():
    """On the CPU, to_host copied every target before its shard is written (a model may hand out one buffer each call);
    a top-k target keeps only top_k's new K-sized tensors, so its logits were copied whole for nothing (float32 logits
    stored as float32: 1.25 times their bytes made, now 0.25: top_k's comparison with the K-th value)."""
    import importlib

    to_host = importlib.import_module("kdcache.extract").to_host
    logits = torch.randn(2, 4, 32_000)
    target = layout.Target("logits", layout.LOGITS, (4, 8), "float32", "", "tensor", topk=8, classes=32_000)
    Made.nbytes = 0
    with Made():
        host, _ = to_host({layout.LOGITS: logits}, {layout.LOGITS: target}, torch.device("cpu"))
    assert Made.nbytes < logits.nbytes / 2, Made.nbytes / logits.nbytes
    values, classes = logits.topk(8, dim=-1)
    assert torch.equal(host[layout.LOGITS], values) and torch.equal(host[layout.LOGITS_INDICES], classes.int())


def test_kl_against_a_topk_store_holds_no_teacher_tensor_of_every_class():
    """The teacher's side of the top-k kl is (B, ..., K): spread over the classes first (topk_logits, then kl_divergence)
    it held tensors as large as the student's logits, several of them, for a language model's vocabulary. Counted as the
    elements of every tensor the loss's ops make, forward and backward, at 32,000 classes and K = 8."""
    from kdcache import losses

    def made(loss) -> float:
        student = torch.randn(2, 4, 32_000, requires_grad=True)
        values, classes = torch.randn(2, 4, 32_000).half().topk(8, dim=-1)
        Made.nbytes = 0
        with Made():
            loss(student, values, classes).backward()
        return Made.nbytes / student.nbytes

    sparse = made(lambda s, v, c: losses.topk_kl_divergence(s, v, c, 2.0))
    spread = made(lambda s, v, c: losses.kl_divergence(s, losses.topk_logits(v, c, 32_000), 2.0))
    print(f"student-logit-sized tensors made: {sparse:.2f} top-k, {spread:.2f} spread over the classes")
    assert sparse * 2 < spread, (sparse, spread)


def test_training_from_a_topk_store_scores_the_stored_top_class(tmp_path):
    """kl trains from the K stored logits; eval_teacher_accuracy counts the stored top-1 class (here i % 16) against the
    label (3 i % 5): the same count as a full-logits store's."""
    out = str(tmp_path / "peaked.zarr")
    kdcache.extract(peaked(), out)
    result = kdcache.train(peaked(train={"eval_cache": out, "eval_split": "train"}), out, tmp_path / "run")
    assert np.isfinite(result["loss_kl"])
    assert result["eval_teacher_accuracy"] == sum(i % 16 == (3 * i) % 5 for i in range(50)) / 50
    assert 0 <= result["eval_agreement"] <= 1


def test_an_eval_store_of_topk_logits_scores_a_run_of_full_logits_and_the_other_way(peaked_store, tmp_path):
    """train.eval_cache need not store the logits as the training store does: the teacher's top class is the same."""
    full = str(tmp_path / "full.zarr")
    kdcache.extract(peaked(targets={"topk": 0}), full)
    for trained, evaluated, k in ((full, peaked_store, 0), (peaked_store, full, 3)):
        result = kdcache.train(peaked(targets={"topk": k}, train={"eval_cache": evaluated, "eval_split": "train"}), trained,
                               tmp_path / f"run{k}")
        assert result["eval_teacher_accuracy"] == sum(i % 16 == (3 * i) % 5 for i in range(50)) / 50


def test_kl_against_the_top_1_of_many_classes_trains_and_is_not_taken_for_one_class(tmp_path):
    """A store of targets.topk = 1 holds one value per position, of the teacher's 16 classes: kl against it is the student's
    cross-entropy at the teacher's top class, not 0. The check refusing kl over logits of one class (softmax of one is 1)
    looked at the stored width and refused it, in the run and in the dry run's warnings."""
    out = str(tmp_path / "top1.zarr")
    kdcache.extract(peaked(targets={"topk": 1}), out)
    assert not kdcache.dry_run(peaked(targets={"topk": 1}))["warnings"]
    assert kdcache.train(peaked(targets={"topk": 1}), out, tmp_path / "run")["loss_kl"] > 0


@pytest.mark.parametrize("classes", [10, 20])
def test_a_student_of_another_class_count_is_refused_in_one_line(peaked_store, tmp_path, classes):
    """The stored classes run to 15: a student of 10 classes failed in the gather (IndexError on the CPU, a device-side
    assert on a GPU), one of 20 trained its extra classes from nothing; both are named as the full logits' kl names them."""
    from kdcache.errors import ShapeMismatchError

    with pytest.raises(ShapeMismatchError, match=re.escape(
            f"student shape (8, {classes}) does not match the teacher's 16 classes (top 3 stored per position); make the "
            "student's output layer produce 16 classes")) as e:
        kdcache.train(peaked(student={"factory": f"topk_zoo.py:student_of_{classes}"}), peaked_store, tmp_path / "run")
    assert "\n" not in str(e.value)


def test_a_per_token_student_of_a_per_sample_topk_store_is_told_the_stored_shape_over_every_class(peaked_store, tmp_path):
    """The stored logits' shape a per-token student is told is the teacher's, [16], not the K values stored of it ([3])."""
    from kdcache.errors import ShapeMismatchError

    with pytest.raises(ShapeMismatchError, match=re.escape(
            "topk_kl_divergence: student shape (8, 5, 16) does not fit the teacher's top-k values (8, 3): the student's output "
            "has more axes than the stored logits (per-sample shape [16]); student.select picks")) as e:
        kdcache.train(peaked(student={"factory": "topk_zoo.py:per_token"}), peaked_store, tmp_path / "run")
    assert "\n" not in str(e.value)


def test_mse_on_a_topk_store_is_refused_in_one_line(tmp_path):
    out = str(tmp_path / "peaked.zarr")
    kdcache.extract(peaked(), out)
    with pytest.raises(PipelineError, match=r"^train.loss.mse = 0.5 compares every class's logit, but .* stores the teacher's "
                                            r"top 3 of 16 \(targets.topk\); set train.loss.mse = 0") as e:
        kdcache.train(peaked(train={"loss": {"kl": 1.0, "mse": 0.5}}), out, tmp_path / "run")
    assert "\n" not in str(e.value)
    warnings = kdcache.dry_run(peaked(train={"loss": {"kl": 1.0, "mse": 0.5}}))["warnings"]
    assert warnings == ["train.loss.mse compares every class's logit, which targets.topk = 3 leaves out: kdcache train would refuse "
                        "this store; set train.loss.mse = 0 (kl trains from the top-k logits), or targets.topk = 0"]


def test_a_per_token_text_store_of_every_class_as_topk_trains_exactly_as_the_full_logits(tmp_path):
    """The text example (per-token logits, train.mask leaving the padding out) from a store of its 64 classes as top-k
    trains to the very losses of its full-logits store, and from a top-8 store to finite, falling ones."""
    runs = {}
    for name, k in (("full", 0), ("all", 64), ("top8", 8)):
        overrides = ["extract.device=cpu", "train.device=cpu", "train.epochs=2", f"targets.topk={k}"]
        pipeline = kdcache.load_pipeline(TEXT, overrides)
        kdcache.extract(pipeline, str(tmp_path / f"{name}.zarr"))
        kdcache.train(pipeline, str(tmp_path / f"{name}.zarr"), tmp_path / name)
        runs[name] = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    terms = ("loss", "loss_kl", "loss_feat:final_norm")
    assert [[line[t] for t in terms] for line in runs["all"]] == [[line[t] for t in terms] for line in runs["full"]]
    kl = [line["loss_kl"] for line in runs["top8"]]
    assert np.all(np.isfinite(kl)) and kl[-1] < kl[0] and kl != [line["loss_kl"] for line in runs["full"]]


# -- stats, interchange, scale-out ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def peaked_store(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("topk") / "peaked.zarr")
    kdcache.extract(peaked(), out)
    return out


def assert_same_arrays(a: str, b: str) -> None:
    sa, sb = kdcache.open_store(a), kdcache.open_store(b)
    assert sa.paths() == sb.paths() and layout.LOGITS_INDICES in sa.paths()
    for path in sa.paths() + [layout.DONE, layout.DIGEST]:
        x, y = sa.array(path), sb.array(path)
        assert x.dtype == y.dtype and x.shape == y.shape and x.chunks == y.chunks, path
        np.testing.assert_array_equal(x[:], y[:], err_msg=path)
    assert {k: v for k, v in sa.manifest.items() if k not in ("created", "completed")} == \
        {k: v for k, v in sb.manifest.items() if k not in ("created", "completed")}


def test_stats_take_the_stored_top_class_and_the_entropy_of_the_renormalised_top_k(peaked_store):
    from kdcache.stats import stats, stats_text

    s = stats(peaked_store)
    assert s["teacher_accuracy"] == sum(i % 16 == (3 * i) % 5 for i in range(50)) / 50
    values = np.array([[0.0, -1.0, -1.0]] * 50)  # peaks at 1..14; 0 and 15 have one neighbour: (0, -1, -2)
    values[[0, 15, 16, 31, 32, 47, 48]] = [0.0, -1.0, -2.0]
    p = np.exp(values) / np.exp(values).sum(-1, keepdims=True)
    assert s["mean_entropy"] == pytest.approx(float((-(p * np.log(p)).sum(-1)).mean()))
    assert s["entropy_topk"] == 3 and "over the top 3 stored logits, renormalised" in stats_text(s)


def test_hdf5_export_import_and_pack_carry_the_topk_classes(peaked_store, tmp_path):
    import h5py

    from kdcache.interop import export_hdf5, import_hdf5, pack

    h5 = tmp_path / "peaked.h5"
    export_hdf5(peaked_store, h5)
    with h5py.File(h5) as f:
        assert f[layout.LOGITS_INDICES].dtype == np.int32 and f[layout.LOGITS_INDICES].shape == (50, 3)
    import_hdf5(h5, str(tmp_path / "back.zarr"))
    assert_same_arrays(peaked_store, str(tmp_path / "back.zarr"))
    assert kdcache.open_store(str(tmp_path / "back.zarr")).manifest["format_version"] == 2
    pack(peaked_store, tmp_path / "peaked.zarr.zip")
    assert_same_arrays(peaked_store, str(tmp_path / "peaked.zarr.zip"))


@pytest.mark.slow
def test_a_dask_cluster_writes_the_single_process_topk_store(peaked_store, tmp_path):
    pytest.importorskip("distributed")
    from kdcache.distributed import extract_distributed

    out = str(tmp_path / "dask.zarr")
    extract_distributed(peaked(), out, workers=1)
    assert_same_arrays(peaked_store, out)


@pytest.mark.slow
def test_torchrun_ranks_write_the_single_process_topk_store(tmp_path):
    """Two gloo ranks on the CPU, each writing its shards' values and classes: the one-process store, digests included."""
    from test_distributed import _torchrun

    toml = tmp_path / "tiny.toml"
    toml.write_text((FIXTURES / "tiny.toml").read_text().replace('"tiny.py:', f'"{FIXTURES}/tiny.py:'))
    sets = ["--set", "targets.topk=2", "--set", "targets.layers=[]"]
    kdcache.extract(kdcache.load_pipeline(toml, [s for s in sets if s != "--set"]), str(tmp_path / "one.zarr"))
    r = _torchrun("extract", str(toml), "--out", str(tmp_path / "ranks.zarr"), *sets, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_arrays(str(tmp_path / "one.zarr"), str(tmp_path / "ranks.zarr"))


def test_an_older_reader_refuses_a_topk_store_by_its_format_version(peaked_store, tmp_path):
    """kdcache <= 0.1.14 (and FORMAT.md's version-1 reader) checks format_version == 1 before anything else: a top-k store,
    whose values at targets/logits would otherwise read as every class's logits, is version 2. A version-1 manifest with a
    top-k target is refused as damaged."""
    m = kdcache.open_store(peaked_store).manifest
    assert m["format_version"] == 2
    copy = tmp_path / "v1.zarr"
    shutil.copytree(peaked_store, copy)
    g = zarr.open_group(str(copy), mode="r+")
    g.attrs["kdcache"] = {**m, "format_version": 1}
    with pytest.raises(kdcache.KdcacheError, match=r"damaged manifest: format_version = 1, expected 2 in a store of top-k logits"):
        kdcache.open_store(str(copy))
    g.attrs["kdcache"] = {**m, "targets": {"logits": {**m["targets"]["logits"], "topk": 2}}}
    with pytest.raises(kdcache.KdcacheError, match=r"targets.logits.topk = 2, expected the last size of its shape \[3\]"):
        kdcache.open_store(str(copy))
    g.attrs["kdcache"] = {**m, "targets": {"logits": {**m["targets"]["logits"], "classes": 2**31}}}  # beyond an int32 class
    with pytest.raises(kdcache.KdcacheError, match=r"targets.logits.classes = 2147483648, expected an integer from topk \(3\) to "
                                                   r"2\*\*31 - 1 \(its classes are int32\)"):
        kdcache.open_store(str(copy))


def test_a_topk_run_of_dict_items_cut_inside_an_epoch_resumes_to_the_uninterrupted_run(tmp_path):
    """Top-k per-token logits of dict items (extract_zoo.TokenLM over items with an entry the student does not take:
    student.inputs, train.mask), streamed in shuffled buffers by 2 DataLoader workers over a subset, cut inside the
    second epoch (train.steps) and resumed: the resumed epoch serves the batches the uninterrupted run had left, their
    values and classes with them, so weights and losses are the uninterrupted run's."""
    from test_student_inputs import TAKES, token_pipeline

    store = str(tmp_path / "typed.zarr")
    kdcache.extract(from_dict({**token_pipeline().to_dict(), "targets": {"dtype": "float32", "topk": 4}}, root=FIXTURES), store)
    assert kdcache.open_store(store).targets["logits"].topk == 4

    def run(out: str, **values) -> list[dict]:
        pipeline = token_pipeline(inputs=TAKES, epochs=3, subset=37, mask="attention_mask", schedule="constant", memory_budget_mb=0,
                                  shuffle_buffer_shards=2, num_workers=2, **values)
        kdcache.train(pipeline, store, tmp_path / out, resume=(tmp_path / out / "checkpoint.pt").exists())
        return [json.loads(line) for line in (tmp_path / out / "metrics.jsonl").read_text().splitlines()]

    whole = run("whole")
    run("cut", steps=6)  # 37 rows, batches of 8 in buffers of 20 rows: 5 batches an epoch
    resumed = run("cut")
    terms = [[line[k] for k in ("epoch", "step", "loss_kl")] for line in whole]
    assert [[line[k] for k in ("epoch", "step", "loss_kl")] for line in resumed] == terms and len(terms) == 3
    a, b = torch.load(tmp_path / "whole" / "student.pt"), torch.load(tmp_path / "cut" / "student.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
