"""Tests for kdcache.losses: each loss against a naive loop/formula reference, plus heads."""

from __future__ import annotations

import functools
import io
import math
import pickle
import re

import pytest
import torch
import torch.nn.functional as F

from kdcache.errors import KdcacheError, ShapeMismatchError
from kdcache.losses import (
    cross_entropy,
    feature_mse,
    kl_divergence,
    logit_mse,
    probability_mse,
    projection_head,
    top1_agreement,
    top1_correct,
    top1_matches,
    topk_kl_divergence,
)

# --------------------------------------------------------------------------- references


def _ref_softmax(row: list[float], t: float) -> list[float]:
    m = max(x / t for x in row)
    exps = [math.exp(x / t - m) for x in row]
    z = sum(exps)
    return [e / z for e in exps]


def _ref_kl(student: torch.Tensor, teacher: torch.Tensor, t: float) -> float:
    """KL(p_t || p_s) per row via python loops, mean over rows, times T^2."""
    s_rows = student.double().reshape(-1, student.shape[-1]).tolist()
    t_rows = teacher.double().reshape(-1, teacher.shape[-1]).tolist()
    total = 0.0
    for s_row, t_row in zip(s_rows, t_rows):
        p_s, p_t = _ref_softmax(s_row, t), _ref_softmax(t_row, t)
        total += sum(pt * (math.log(pt) - math.log(ps)) for pt, ps in zip(p_t, p_s))
    return total / len(s_rows) * t * t


def _ref_mse(a: torch.Tensor, b: torch.Tensor) -> float:
    xs, ys = a.double().flatten().tolist(), b.double().flatten().tolist()
    return sum((x - y) ** 2 for x, y in zip(xs, ys)) / len(xs)


def _ref_ce(logits: torch.Tensor, labels: torch.Tensor) -> float:
    total = 0.0
    for row, y in zip(logits.double().tolist(), labels.tolist()):
        total += -math.log(_ref_softmax(row, 1.0)[y])
    return total / len(labels)


def _logits(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * 2.0


# --------------------------------------------------------------------------- kl_divergence


def test_kl_zero_for_identical_logits() -> None:
    x = _logits(4, 5, seed=0)
    for t in (1.0, 2.0, 4.0):
        assert kl_divergence(x, x.clone(), t).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("t", [1.0, 2.0, 4.0])
def test_kl_matches_reference_with_t_squared_scaling(t: float) -> None:
    s, te = _logits(4, 5, seed=1), _logits(4, 5, seed=2)
    got = kl_divergence(s, te, temperature=t)
    assert got.dtype == torch.float32 and got.ndim == 0
    assert got.item() == pytest.approx(_ref_kl(s, te, t), rel=1e-5)
    assert got.item() > 0


def test_kl_float16_teacher_is_upcast() -> None:
    s, te = _logits(4, 5, seed=3), _logits(4, 5, seed=4).half()
    got = kl_divergence(s, te, temperature=2.0)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(_ref_kl(s, te.float(), 2.0), rel=1e-5)


def test_kl_3d_token_logits_mean_over_all_positions() -> None:
    s, te = _logits(2, 3, 6, seed=5), _logits(2, 3, 6, seed=6)
    got = kl_divergence(s, te, temperature=2.0)
    assert got.item() == pytest.approx(_ref_kl(s, te, 2.0), rel=1e-5)


def test_kl_teacher_minus_inf_logit_gives_finite_loss() -> None:
    s = _logits(2, 4, seed=7)
    te = _logits(2, 4, seed=8)
    te[:, 0] = float("-inf")
    got = kl_divergence(s, te)
    assert torch.isfinite(got)
    # Exact: sum over classes with p_t > 0 of p_t * (log p_t - log p_s), with log p_s over all 4 classes.
    log_p_s = torch.log_softmax(s.double(), -1)
    p_t = torch.softmax(te[:, 1:].double(), -1)
    exact = (p_t * (p_t.log() - log_p_s[:, 1:])).sum(-1).mean()
    assert got.item() == pytest.approx(exact.item(), rel=1e-5)


def test_kl_gradients_flow_to_student_only() -> None:
    s = _logits(3, 4, seed=9).requires_grad_()
    te = _logits(3, 4, seed=10).requires_grad_()
    kl_divergence(s, te, temperature=2.0).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert te.grad is None


def _ref_kl_and_grad(student: torch.Tensor, teacher: torch.Tensor, t: float) -> tuple[float, torch.Tensor]:
    """The divergence and its gradient to the student's logits, in float64 (vectorised: 50,000 classes)."""
    s = student.double().requires_grad_()
    log_p_s, log_p_t = F.log_softmax(s / t, -1), F.log_softmax(teacher.double() / t, -1)
    value = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).mean() * t * t
    value.backward()
    return value.item(), s.grad


@pytest.mark.parametrize(("classes", "t", "spread"), [(50_000, 1000.0, 2.0), (1000, 1000.0, 0.02), (50_000, 100.0, 0.2)])
def test_kl_of_nearly_uniform_distributions_is_accurate(classes: int, t: float, spread: float) -> None:
    # softmax(logits / T) of many classes at a high T is nearly uniform: float32's log p_t - log p_s (two numbers near
    # -ln C) lost the divergence (3 % to 10x off, the gradient up to 3 %); float64 there keeps both to float32's precision
    te = _logits(4, classes, seed=20)
    s = (te + _logits(4, classes, seed=21) * spread).requires_grad_()
    want, want_grad = _ref_kl_and_grad(s.detach(), te.half().float(), t)
    got = kl_divergence(s, te.half(), t)
    got.backward()
    assert got.dtype == torch.float32 and got.item() == pytest.approx(want, rel=1e-5)
    assert s.grad.dtype == torch.float32 and ((s.grad.double() - want_grad).norm() / want_grad.norm()).item() < 1e-5


LOGIT_LOSSES = {  # each with its float64 reference (torch ops, vectorised: _ref_kl's loops would be slow over the grid below)
    "kl": (kl_divergence, lambda s, te, t: t * t * (F.softmax(te / t, -1) * (F.log_softmax(te / t, -1) - F.log_softmax(s / t, -1))).sum(-1).mean()),
    "logit_mse": (lambda s, te, t: logit_mse(s, te), lambda s, te, t: (s - te).square().mean()),
    "probability_mse": (probability_mse, lambda s, te, t: (F.softmax(s / t, -1) - F.softmax(te / t, -1)).square().sum(-1).mean()),
}


@pytest.mark.parametrize("name", sorted(LOGIT_LOSSES))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("scale", [3.0, 6e4], ids=["plain", "near-float16-max"])
def test_logit_losses_and_their_gradients_match_float64_over_temperatures_classes_and_teacher_dtypes(name, dtype, scale) -> None:
    """T 1 to 10, 1, 2 or 10 classes, a teacher of float16 / bfloat16 / float32 logits up to ±6e4 (float16's range): the
    value and the gradient to a float64 student's logits are the float64 formula's of the same (rounded) teacher."""
    loss, reference = LOGIT_LOSSES[name]
    # a gradient's error, to its largest entry: float32's own; near ±6e4, s / T rounds to float32's step there (5e-4 at 6e3),
    # which a difference of two such logits (p_s of two close classes) keeps: 1.5e-4 seen at T = 10
    tol = 1e-5 if scale < 100 else 1e-3
    for t in (1.0, 2.0, 4.0, 10.0):
        for classes in (1, 2, 10):
            s = (_logits(6, classes, seed=classes) * scale / 2).clamp(-6e4, 6e4).requires_grad_()
            te = (_logits(6, classes, seed=classes + 1) * scale / 2).clamp(-6e4, 6e4).to(dtype)
            s64 = s.detach().double().requires_grad_()
            got, want = loss(s, te, t), reference(s64, te.double(), t)
            assert got.dtype == torch.float32 and got.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-6), (t, classes)
            (got_grad,), (want_grad,) = torch.autograd.grad(got, s), torch.autograd.grad(want, s64)
            assert (got_grad.double() - want_grad).abs().max() <= tol * want_grad.abs().max() + 1e-12, (t, classes)


@pytest.mark.parametrize("t", [0.0, -1.0, float("nan"), float("inf")])
def test_kl_rejects_bad_temperature(t: float) -> None:
    x = _logits(2, 3, seed=0)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        kl_divergence(x, x, temperature=t)


@pytest.mark.parametrize("name", ["kl_divergence", "logit_mse", "probability_mse", "feature_mse", "top1_matches", "top1_agreement",
                                  "topk_kl_divergence", "cross_entropy", "kl_divergence mask"])
def test_a_numpy_array_in_a_tensors_place_is_named_in_one_line(name: str) -> None:
    """A loop of one's own passing ``store.read``'s rows (numpy) as the teacher's: it failed inside torch with
    ``'numpy.ndarray' object has no attribute 'detach'`` (kl_divergence) or a TypeError of torch's; now one TypeError naming
    the loss, the argument, its type and shape and the conversion."""
    import numpy as np

    from kdcache import losses

    s, rows = _logits(4, 10, seed=0), np.zeros((4, 10), np.float16)
    call = {"topk_kl_divergence": lambda: losses.topk_kl_divergence(s, rows[:, :3], torch.zeros(4, 3, dtype=torch.int64)),
            "cross_entropy": lambda: losses.cross_entropy(s, np.zeros(4, np.int64)),
            "kl_divergence mask": lambda: losses.kl_divergence(s[:, None], s[:, None], mask=np.ones((4, 1), bool))}.get(
        name, lambda: getattr(losses, name)(s, rows))
    argument = {"topk_kl_divergence": "values", "cross_entropy": "labels", "kl_divergence mask": "mask"}.get(name, "te")
    with pytest.raises(TypeError, match=rf"^{name.split()[0]}: {argument}\w* must be a torch.Tensor, got numpy.ndarray of shape "
                                        r"\(4,.*\); convert it with torch.as_tensor"):
        call()


def test_top_k_values_passed_as_full_logits_name_the_top_k_loss() -> None:
    """A loop of one's own over a top-k store passing ``batch["targets"]["targets/logits"]`` (K values) to kl_divergence was
    told to make the student produce K classes, which would be wrong; the line names topk_kl_divergence too."""
    student, values = _logits(4, 64, seed=0), _logits(4, 8, seed=1)
    for loss in (kl_divergence, logit_mse, top1_matches):
        with pytest.raises(ShapeMismatchError, match=r"produce 8 classes .*; or, where the teacher's are a top-k store's values "
                                                     r"\(targets.topk.*use topk_kl_divergence\(student_logits, values, classes\)"):
            loss(student, values)
    with pytest.raises(ShapeMismatchError) as more:  # a teacher of more classes than the student: no top-k in question
        kl_divergence(values, student)
    assert "top-k" not in str(more.value)


def test_kl_shape_mismatch() -> None:
    with pytest.raises(ShapeMismatchError, match=r"student shape \(2, 3\).*teacher shape \(2, 5\).*5 classes"):
        kl_divergence(_logits(2, 3, seed=0), _logits(2, 5, seed=0))
    with pytest.raises(ShapeMismatchError, match=r"\(B, C\).*got student shape \(3,\) and teacher shape \(3,\); "
                                                 r"a regression output .* logit_mse alone \(train.loss.mse"):
        kl_divergence(_logits(3, seed=0), _logits(3, seed=0))


# --------------------------------------------------------------------------- other losses


def test_logit_mse_matches_reference_and_is_float32() -> None:
    s, te = _logits(3, 4, seed=11), _logits(3, 4, seed=12).half()
    got = logit_mse(s, te)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(_ref_mse(s, te.float()), rel=1e-5)
    assert logit_mse(s, s.clone()).item() == 0.0


def test_logit_mse_distils_a_regression_output_of_one_value_per_sample() -> None:
    """A teacher of one value per sample (a regression head: the store's logits are (N,)) is distilled with the squared
    error alone; a student of another batch or of class logits against it is a shape error."""
    s, te = _logits(6, seed=13), _logits(6, seed=14).half()
    assert logit_mse(s, te).item() == pytest.approx(_ref_mse(s, te.float()), rel=1e-5)
    with pytest.raises(ShapeMismatchError, match=r"student shape \(5,\) does not match teacher shape \(6,\)"):
        logit_mse(_logits(5, seed=0), te)
    with pytest.raises(ShapeMismatchError, match=r"student shape \(6, 1\) and teacher shape \(6,\); a regression output"):
        logit_mse(_logits(6, 1, seed=0), te)


@pytest.mark.parametrize("t", [1.0, 4.0])
def test_probability_mse_matches_reference(t: float) -> None:
    """sum over classes of (softmax(s/T) - softmax(t/T))**2, averaged over rows; per-token logits: over positions."""
    s, te = _logits(5, 7, seed=31), _logits(5, 7, seed=32).half()

    def ref(a: torch.Tensor, b: torch.Tensor) -> float:
        rows = [(_ref_softmax(x, t), _ref_softmax(y, t)) for x, y in zip(a.double().tolist(), b.double().tolist())]
        return sum(sum((p - q) ** 2 for p, q in zip(ps, qs)) for ps, qs in rows) / len(rows)

    got = probability_mse(s, te, t)
    assert got.dtype == torch.float32 and got.item() == pytest.approx(ref(s, te.float()), rel=1e-5)
    tokens_s, tokens_t = _logits(2, 3, 7, seed=33), _logits(2, 3, 7, seed=34)
    assert probability_mse(tokens_s, tokens_t, t).item() == pytest.approx(ref(tokens_s.reshape(6, 7), tokens_t.reshape(6, 7)), rel=1e-5)
    assert probability_mse(s, s + 3.0, t).item() == pytest.approx(0.0, abs=1e-7)  # a constant per row: the same distribution
    onehot = torch.tensor([[100.0, 0.0, 0.0]])
    assert probability_mse(onehot, torch.tensor([[0.0, 100.0, 0.0]]), 1.0).item() == pytest.approx(2.0)  # the bound
    student = s.clone().requires_grad_()
    teacher = te.float().requires_grad_()
    probability_mse(student, teacher, t).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0 and teacher.grad is None
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="probability_mse: temperature must be a finite number > 0"):
            probability_mse(s, te, bad)
    with pytest.raises(ShapeMismatchError, match="probability_mse"):
        probability_mse(s, te[:, :6])


def test_feature_mse_matches_reference() -> None:
    s, te = _logits(2, 3, 4, 4, seed=13), _logits(2, 3, 4, 4, seed=14)
    got = feature_mse(s.bfloat16(), te)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(_ref_mse(s.bfloat16().float(), te), rel=1e-5)


def test_feature_mse_shape_mismatch_is_error() -> None:
    with pytest.raises(ShapeMismatchError, match=r"\(2, 8\).*\(2, 4, 2\).*projection_head") as info:
        feature_mse(torch.zeros(2, 8), torch.zeros(2, 4, 2))
    assert isinstance(info.value, KdcacheError) and isinstance(info.value, ValueError)


def test_mse_of_float16_targets_is_computed_in_float32() -> None:
    # stored targets may be float16: their squared differences (300^2 here) would overflow float16's 65504
    te = (_logits(4, 64, seed=22) * 150).half()
    s = (te.float() + _logits(4, 64, seed=23) * 150).half()
    for loss in (logit_mse, feature_mse):
        got = loss(s, te)
        assert got.dtype == torch.float32 and got.item() == pytest.approx(_ref_mse(s, te), rel=1e-6)


def test_mse_gradients_flow_to_student_only() -> None:
    for loss in (logit_mse, feature_mse):
        s = _logits(3, 4, seed=15).requires_grad_()
        te = _logits(3, 4, seed=16).requires_grad_()
        loss(s, te).backward()
        assert s.grad is not None and s.grad.abs().sum() > 0
        assert te.grad is None


def test_cross_entropy_matches_reference() -> None:
    s = _logits(5, 4, seed=17)
    labels = torch.tensor([0, 3, 1, 1, 2])
    got = cross_entropy(s, labels)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(_ref_ce(s, labels), rel=1e-5)
    assert cross_entropy(s.half(), labels).item() == pytest.approx(_ref_ce(s.half().float(), labels), rel=1e-4)


def test_cross_entropy_bad_labels() -> None:
    with pytest.raises(ShapeMismatchError, match=r"labels shape \(4,\).*logits shape \(5, 4\)"):
        cross_entropy(_logits(5, 4, seed=0), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="int64.*labels.long"):
        cross_entropy(_logits(5, 4, seed=0), torch.zeros(5, dtype=torch.int32))


def test_top1_agreement() -> None:
    s = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 3.0], [5.0, 0.0, 0.0]])
    te = torch.tensor([[9.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]).half()
    got = top1_agreement(s, te)
    assert got.dtype == torch.float32 and got.item() == pytest.approx(0.5)
    # Reference via loops on random 3-D logits: fraction of (b, t) positions that agree.
    a, b = _logits(2, 3, 4, seed=18), _logits(2, 3, 4, seed=19)
    rows = zip(a.reshape(-1, 4).tolist(), b.reshape(-1, 4).tolist())
    ref = sum(r.index(max(r)) == q.index(max(q)) for r, q in rows) / 6
    assert top1_agreement(a, b).item() == pytest.approx(ref)


def _tops(row: list[float]) -> set[int]:
    return {c for c, x in enumerate(row) if x == max(row)}


def _ref_matches(student: torch.Tensor, teacher: torch.Tensor) -> list[float]:
    """|S ∩ T| / (|S| |T|) per row, by sets: the chance of agreeing when each side breaks its ties at random."""
    rows = zip(student.reshape(-1, student.shape[-1]).tolist(), teacher.float().reshape(-1, teacher.shape[-1]).tolist())
    return [len(_tops(r) & _tops(q)) / (len(_tops(r)) * len(_tops(q))) for r, q in rows]


def test_a_tie_at_the_top_counts_by_its_share_not_by_the_lowest_class() -> None:
    # float32 teacher logits 5.0001 and 5.0002 are both 5.0 in float16: argmax said class 0 (the float32 teacher's top is 1)
    teacher = torch.tensor([[5.0001, 5.0002, 1.0], [5.0001, 5.0002, 1.0], [0.0, 2.0, 2.0], [3.0, 3.0, 3.0]]).half()
    student = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 4.0, 4.0]])
    assert top1_matches(student, teacher).tolist() == [0.5, 0.5, 0.5, 1 / 3] == _ref_matches(student, teacher)
    assert top1_agreement(student, teacher).item() == pytest.approx((0.5 * 3 + 1 / 3) / 4)
    labels = torch.tensor([1, 2, 2, 0])
    assert top1_correct(teacher, labels).tolist() == [0.5, 0.0, 0.5, 1 / 3]
    # a label below 0 (none) or beyond the classes, and a NaN row (no top class), count 0
    odd = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [float("nan"), 1.0, 0.0]])
    assert top1_correct(odd, torch.tensor([-1, 3, 1])).tolist() == [0.0, 0.0, 0.0]
    assert top1_matches(odd, odd).tolist() == [1.0, 1.0, 0.0]


def test_top1_metrics_do_not_depend_on_how_the_classes_are_numbered() -> None:
    # coarse float16 logits (steps of 0.5 over 6 classes) tie at the top in most rows; a permutation of the class axis
    # (the same for student, teacher and labels) must leave every metric as it was
    g = torch.Generator().manual_seed(24)
    teacher = (torch.randint(0, 4, (64, 6), generator=g) * 0.5).half()
    student = (torch.randint(0, 4, (64, 6), generator=g) * 0.5).float()
    labels = torch.randint(0, 6, (64,), generator=g)
    order = torch.randperm(6, generator=g)
    renumbered = torch.empty_like(order)
    renumbered[order] = torch.arange(6)  # class order[i] is class i in the permuted numbering
    assert sum(len(_tops(r)) > 1 for r in teacher.float().tolist()) > 20
    assert top1_matches(student, teacher).tolist() == pytest.approx(_ref_matches(student, teacher))
    assert top1_agreement(student[:, order], teacher[:, order]).item() == pytest.approx(top1_agreement(student, teacher).item())
    assert top1_correct(teacher[:, order], renumbered[labels]).tolist() == pytest.approx(top1_correct(teacher, labels).tolist())


# --------------------------------------------------------------------------- projection_head


@pytest.mark.parametrize(
    ("student", "teacher", "description"),
    [
        ((32, 7, 7), (64, 14, 14), "1x1 conv 32->64 + interpolate 7x7->14x14"),
        ((32, 14, 14), (64, 7, 7), "1x1 conv 32->64 + adaptive avg pool 14x14->7x7"),
        ((8, 14, 6), (8, 7, 7), "adaptive avg pool 14x6->7x6 + interpolate 7x6->7x7"),  # larger in one dim only
        ((8, 14, 14), (8, 7, 7), "adaptive avg pool 14x14->7x7"),
        ((8, 7, 7), (16, 7, 7), "1x1 conv 8->16"),
        ((16,), (24,), "linear 16->24"),
        ((5, 16), (5, 24), "linear 16->24 per token (T=5)"),
        ((8, 4, 4), (10,), "global avg pool 4x4 + linear 8->10"),
        ((8, 4, 4), (16, 12), "1x1 conv 8->12 + 4x4 grid as 16 tokens"),
        ((8, 3, 4), (12, 8), "3x4 grid as 12 tokens"),  # the map's own positions, not a square
        ((8, 28, 28), (196, 12), "1x1 conv 8->12 + adaptive avg pool 28x28->14x14 + 14x14 grid as 196 tokens"),
        ((16, 6), (8, 4, 4), "16 tokens as a 4x4 grid + 1x1 conv 6->8"),
        ((16, 6), (8, 8, 8), "16 tokens as a 4x4 grid + 1x1 conv 6->8 + interpolate 4x4->8x8"),
    ],
)
def test_projection_head_shapes(student: tuple[int, ...], teacher: tuple[int, ...], description: str) -> None:
    torch.manual_seed(0)
    head = projection_head(student, teacher, name="layer3")
    assert head is not None
    assert head.description == description
    assert description in repr(head)
    out = head(torch.randn(2, *student))
    assert tuple(out.shape) == (2, *teacher)


def test_projection_head_none_on_equal_shapes() -> None:
    assert projection_head((8, 4, 4), (8, 4, 4)) is None
    assert projection_head((16,), (16,)) is None
    assert projection_head([5, 16], (5, 16)) is None


def test_projection_head_resampling_modes() -> None:
    x = torch.randn(1, 2, 4, 4)
    pooled = projection_head((2, 4, 4), (2, 2, 2))
    torch.testing.assert_close(pooled(x), torch.nn.functional.adaptive_avg_pool2d(x, (2, 2)))
    up = projection_head((2, 4, 4), (2, 8, 8))
    ref = torch.nn.functional.interpolate(x, size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(up(x), ref)


@pytest.mark.parametrize(
    ("student", "teacher", "fix"),
    [
        ((16,), (8, 4, 4), r"\(C, H, W\) map"),
        ((2, 8, 4, 4), (8, 4, 4), r"\(C, H, W\) map"),
        ((8, 4, 4), (2, 8, 4, 4), "teacher layer whose output is"),
        ((5, 16), (24,), r"\(C, H, W\) map or a \(D,\) vector"),
        ((8, 4, 4), (5, 16), r"teacher's 5 tokens are neither the map's 4x4 positions nor a square patch grid.*\"1:\" drops a leading class token"),
        ((197, 16), (8, 14, 14), r"student's 197 tokens are neither the map's 14x14 positions.*train.features select step \"1:\""),
        ((8,), (16, 4), r"\(T, D\) token sequence with the teacher's T, or a \(C, H, W\) map"),
    ],
)
def test_projection_head_unsupported_pairs(
    student: tuple[int, ...], teacher: tuple[int, ...], fix: str
) -> None:
    shapes = rf"student shape {re.escape(str(student))} to teacher shape {re.escape(str(teacher))}"
    with pytest.raises(ShapeMismatchError, match=rf"target 'blk\.4'.*{shapes}.*{fix}"):
        projection_head(student, teacher, name="blk.4")


def test_map_and_token_heads_lay_tokens_row_major_on_the_patch_grid() -> None:
    """Token t of a ViT patch embedding (``Conv2d`` then ``flatten(2).transpose(1, 2)``) is grid cell (t // W, t % W):
    the heads must pair a map's cell with that token, not with its transpose's."""
    x = torch.randn(2, 6, 3, 4)  # channels as the tokens' dimension: no 1x1 conv, no resampling
    tokens = projection_head((6, 3, 4), (12, 6))(x)
    for t in range(12):
        torch.testing.assert_close(tokens[:, t], x[:, :, t // 4, t % 4])
    torch.testing.assert_close(tokens, x.flatten(2).transpose(1, 2))
    back = projection_head((12, 6), (6, 3, 4))(tokens)
    torch.testing.assert_close(back, x)
    square = projection_head((16, 6), (6, 8, 8))  # 16 tokens on a 4x4 grid, then interpolated to 8x8
    grid = torch.randn(2, 6, 4, 4)
    ref = torch.nn.functional.interpolate(grid, size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(square(grid.flatten(2).transpose(1, 2)), ref)


def test_projection_head_token_count_mismatch() -> None:
    with pytest.raises(ShapeMismatchError, match=r"'tok'.*\(5, 16\) has 5 tokens.*\(6, 24\) has 6.*same token count"):
        projection_head((5, 16), (6, 24), name="tok")


def test_projection_head_rejects_nonpositive_dims() -> None:
    with pytest.raises(ShapeMismatchError, match="positive dimensions.*without the batch dimension"):
        projection_head((0, 4), (3, 4))


def test_projection_head_rejects_wrong_input_shape() -> None:
    head = projection_head((16,), (24,))
    with pytest.raises(ShapeMismatchError, match=r"\(B, \*\(16,\)\), got \(2, 15\)"):
        head(torch.randn(2, 15))


@pytest.mark.parametrize(("student", "teacher"), [((4, 3, 3), (6, 5, 5)), ((5,), (7,)), ((2, 5), (2, 7)), ((4, 3, 3), (7,)),
                                                   ((4, 3, 3), (9, 7)), ((9, 7), (4, 3, 3))])
def test_projection_head_deterministic_and_saveable(student: tuple[int, ...], teacher: tuple[int, ...]) -> None:
    torch.manual_seed(123)
    a = projection_head(student, teacher)
    torch.manual_seed(123)
    b = projection_head(student, teacher)
    x = torch.randn(2, *student)
    torch.testing.assert_close(a(x), b(x))

    clone = pickle.loads(pickle.dumps(a))
    torch.testing.assert_close(clone(x), a(x))
    assert clone.description == a.description

    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    torch.manual_seed(999)
    fresh = projection_head(student, teacher)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    torch.testing.assert_close(fresh(x), a(x))


def test_trained_head_reduces_feature_mse() -> None:
    torch.manual_seed(0)
    student = torch.randn(8, 4, 6, 6)
    teacher = torch.nn.functional.adaptive_avg_pool2d(torch.randn(8, 8, 6, 6), (3, 3)).detach()
    head = projection_head((4, 6, 6), (8, 3, 3))
    opt = torch.optim.SGD(head.parameters(), lr=0.5)
    before = feature_mse(head(student), teacher).item()
    for _ in range(30):
        opt.zero_grad()
        loss = feature_mse(head(student), teacher)
        loss.backward()
        opt.step()
    after = feature_mse(head(student), teacher).item()
    assert after < before


def test_cross_entropy_leaves_out_positions_without_a_label():
    """A label below 0 (-1: STL-10's unlabeled split; -100: Hugging Face's) adds 0; the mean is over every position, so
    the means of K equal parts average to the whole batch's (torchrun's ranks, train.streams), and a batch without a
    label gives 0 with a gradient of 0 rather than NaN."""
    torch.manual_seed(0)
    logits = torch.randn(8, 5, requires_grad=True)
    labels = torch.tensor([0, -1, 3, -100, 4, 1, -1, 2])
    labelled = labels >= 0
    expected = F.cross_entropy(logits[labelled], labels[labelled], reduction="sum") / len(labels)
    torch.testing.assert_close(cross_entropy(logits, labels), expected)
    halves = (cross_entropy(logits[:4], labels[:4]) + cross_entropy(logits[4:], labels[4:])) / 2
    torch.testing.assert_close(halves, cross_entropy(logits, labels))
    none = cross_entropy(logits, torch.full((8,), -1))
    none.backward()
    assert none.item() == 0 and torch.equal(logits.grad, torch.zeros_like(logits))
    torch.testing.assert_close(cross_entropy(logits.detach(), labels.clamp_min(0)), F.cross_entropy(logits.detach(), labels.clamp_min(0)))


def test_cross_entropy_row_without_a_label_adds_0_where_its_class_0_is_minus_inf():
    """A row without a label adds 0 whatever its logits: a student that rules out class 0 with a -inf logit (a padding
    or background class) gave inf * 0 = NaN for each unlabeled row, the loss and every gradient NaN."""
    logits = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))
    logits[:, 0] = float("-inf")
    logits.requires_grad_()
    labels = torch.tensor([2, -1, 4, -100])
    got = cross_entropy(logits, labels)
    got.backward()
    expected = F.cross_entropy(logits.detach()[[0, 2]].double(), labels[[0, 2]], reduction="sum") / 4
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    assert torch.isfinite(logits.grad).all() and torch.equal(logits.grad[[1, 3]], torch.zeros(2, 5))


@pytest.mark.parametrize(("student", "teacher"), [((2, 12, 4), (2, 4, 4)), ((2, 12, 3), (2, 4, 6))])
def test_map_head_pools_a_dimension_that_shrinks_though_the_other_does_not(student, teacher) -> None:
    """A map larger than the teacher's in one dimension only was resampled bilinearly: 12 rows onto 4 read rows 1, 4,
    7, 10 and left the others out of the loss (no gradient); a shrinking dimension is pooled, a growing one interpolated."""
    x = torch.randn(1, *student, generator=torch.Generator().manual_seed(0), requires_grad=True)
    head = projection_head(student, teacher)
    head(x).sum().backward()
    assert (x.grad != 0).all()
    pooled = F.adaptive_avg_pool2d(x.detach(), (4, min(student[2], teacher[2])))
    torch.testing.assert_close(head(x.detach()), F.interpolate(pooled, size=teacher[1:], mode="bilinear", align_corners=False))


def test_stats_counts_a_tie_as_top1_correct_does_without_torch() -> None:
    # kdcache stats reads stores without importing torch: its numpy rule must be losses.top1_correct's, ties, NaN rows,
    # labels below 0 and beyond the classes included
    from kdcache.stats import _top1_correct

    g = torch.Generator().manual_seed(5)
    teacher = (torch.randint(0, 4, (64, 6), generator=g) * 0.5).half()
    teacher[3, 2] = float("nan")
    labels = torch.randint(-1, 7, (64,), generator=g)
    assert sum(len(_tops(r)) > 1 for r in teacher.float().tolist()) > 20 and {-1, 6} <= set(labels.tolist())
    numpy_rule = _top1_correct(teacher.numpy(), labels.numpy()[:, None])
    assert numpy_rule.tolist() == top1_correct(teacher, labels).tolist() and numpy_rule[3] == 0


# --------------------------------------------------------------------------- padding masks


def _ref_masked(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, per_position) -> float:
    """Each row's mean of ``per_position(student[b, t], teacher[b, t])`` over its valid positions (0 for a row with
    none), then the mean over rows: python loops."""
    rows = []
    for b in range(mask.shape[0]):
        values = [per_position(student[b, t], teacher[b, t]) for t in range(mask.shape[1]) if mask[b, t]]
        rows.append(sum(values) / len(values) if values else 0.0)
    return sum(rows) / len(rows)


MASKED_LOSSES = {
    "kl": (lambda s, te, m: kl_divergence(s, te, 2.0, mask=m), lambda s, te: _ref_kl(s[None], te[None], 2.0)),
    "logit_mse": (lambda s, te, m: logit_mse(s, te, mask=m), _ref_mse),
    "probability_mse": (lambda s, te, m: probability_mse(s, te, 2.0, mask=m),
                        lambda s, te: sum((a - b) ** 2 for a, b in zip(_ref_softmax(s.tolist(), 2.0), _ref_softmax(te.tolist(), 2.0)))),
    "feature_mse": (lambda s, te, m: feature_mse(s, te, mask=m), _ref_mse),
}
PADDED = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]])  # row 2: no valid position


@pytest.mark.parametrize("name", sorted(MASKED_LOSSES))
@pytest.mark.parametrize("dtype", [torch.bool, torch.int64, torch.float32])
def test_a_masked_loss_is_the_mean_over_rows_of_each_row_s_mean_over_its_valid_positions(name: str, dtype: torch.dtype) -> None:
    loss, per_position = MASKED_LOSSES[name]
    s, te = _logits(4, 5, 3, seed=30), _logits(4, 5, 3, seed=31)
    got = loss(s, te, PADDED.to(dtype))
    assert got.dtype == torch.float32 and got.ndim == 0
    assert got.item() == pytest.approx(_ref_masked(s, te, PADDED, per_position), rel=1e-5)


@pytest.mark.parametrize("name", sorted(MASKED_LOSSES))
def test_pad_positions_change_neither_a_masked_loss_nor_its_gradient(name: str) -> None:
    loss = MASKED_LOSSES[name][0]
    s, te = _logits(4, 5, 3, seed=32), _logits(4, 5, 3, seed=33)
    pad = ~PADDED.bool()
    s_wild, te_wild = s.clone(), te.clone()
    s_wild[pad], te_wild[pad] = 1e30, float("nan")  # the student's pad outputs are its own; the stored ones anything
    if name in ("kl", "probability_mse"):  # and at valid positions, -inf (a class the teacher rules out) as it was
        te[3:, :, 0] = te_wild[3:, :, 0] = float("-inf")
    values, grads = [], []
    for student, teacher in ((s, te), (s_wild, te_wild)):
        student = student.clone().requires_grad_()
        value = loss(student, teacher, PADDED.bool())
        value.backward()
        values.append(value.detach()), grads.append(student.grad)
    assert torch.isfinite(values[0])
    torch.testing.assert_close(values[1], values[0], rtol=0, atol=0)
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)
    assert not grads[1][pad].any()


@pytest.mark.parametrize("name", sorted(MASKED_LOSSES))
@pytest.mark.parametrize("mask", [None, PADDED], ids=["unmasked", "masked"])
def test_no_gradient_reaches_a_teacher_that_requires_one(name: str, mask: torch.Tensor | None) -> None:
    """The stored targets are constants: a teacher tensor that requires grad (a live teacher's output) is detached."""
    s, te = _logits(4, 5, 3, seed=40).requires_grad_(), _logits(4, 5, 3, seed=41).requires_grad_()
    MASKED_LOSSES[name][0](s, te, mask).backward()
    assert te.grad is None and s.grad is not None and s.grad.abs().sum() > 0


@pytest.mark.parametrize("name", sorted(MASKED_LOSSES))
def test_an_all_true_mask_gives_the_unmasked_loss(name: str) -> None:
    loss = MASKED_LOSSES[name][0]
    s, te = _logits(3, 4, 6, seed=34), _logits(3, 4, 6, seed=35)
    torch.testing.assert_close(loss(s, te, torch.ones(3, 4, dtype=torch.bool)), loss(s, te, None))


def test_a_masked_loss_of_equal_parts_averages_to_the_whole_batch_s() -> None:
    """Rows are the unit torchrun's ranks and train.streams average over: the mean of two halves' losses is the batch's."""
    s, te = _logits(4, 5, 3, seed=36), _logits(4, 5, 3, seed=37)
    halves = [kl_divergence(s[i:i + 2], te[i:i + 2], mask=PADDED[i:i + 2]) for i in (0, 2)]
    torch.testing.assert_close((halves[0] + halves[1]) / 2, kl_divergence(s, te, mask=PADDED))


@pytest.mark.parametrize("name", sorted(MASKED_LOSSES))
@pytest.mark.parametrize(("shape", "mask_shape"), [((4, 5, 3), (4, 4)), ((4, 5, 3), (5,)), ((4, 5, 3), (4, 5, 3)), ((4, 15), (4, 15))])
def test_a_mask_that_does_not_fit_is_a_shape_error(name: str, shape: tuple[int, ...], mask_shape: tuple[int, ...]) -> None:
    loss = MASKED_LOSSES[name][0]
    with pytest.raises(ShapeMismatchError, match=rf"mask shape {re.escape(str(mask_shape))} does not fit shape "
                                                 rf"{re.escape(str(shape))}; a mask is \(B, T\)"):
        loss(_logits(*shape, seed=38), _logits(*shape, seed=39), torch.ones(mask_shape, dtype=torch.bool))


@pytest.mark.parametrize("name", [*sorted(MASKED_LOSSES), "topk_kl"])
@pytest.mark.parametrize(("odd", "seen"), [(0.5, "0.5 (float32)"), (2, "2 (int64)"), (float("nan"), "nan (float32)"), (-1, "-1 (int64)")])
def test_a_mask_of_other_values_than_0_and_1_is_refused(name: str, odd: float, seen: str) -> None:
    """A mask passed to a loss straight (not through train, which checks train.mask's on the host) was made bool: a float
    mask of weights (0.5), a count (2) or NaN counted as true, a wrong loss with no word. Refused in one line naming the
    value; the same 0/1 values as int or float give the bool mask's loss."""
    s, te = _logits(4, 5, 3, seed=40), _logits(4, 5, 3, seed=41)
    values, classes = torch.topk(te, 2, dim=-1)
    loss = (lambda m: topk_kl_divergence(s, values, classes, 2.0, m)) if name == "topk_kl" else functools.partial(MASKED_LOSSES[name][0], s, te)
    mask = PADDED.to(torch.float32 if isinstance(odd, float) else torch.int64, copy=True)
    expected = loss(PADDED.bool())
    for ok in (torch.bool, torch.uint8, torch.int64, torch.float16, torch.float32):
        torch.testing.assert_close(loss(PADDED.to(ok)), expected)
    mask[1, 3] = odd
    with pytest.raises(ValueError, match=rf"mask must hold bool or 0/1 values \(true where a position counts\), got {re.escape(seen)}; "
                                         r"pass mask != 0 for a padding mask \(a loss weights every valid position alike"):
        loss(mask)
