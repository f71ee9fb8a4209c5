"""Distillation losses and projection heads.

The loss functions are pure tensor functions: they compute in float32 whatever
the input dtype (a cached teacher may arrive as float16; ``kl_divergence`` at a
high temperature over many classes in float64, see ``_kl_cast``), treat the teacher as a
fixed target (no gradient flows into it) and return a 0-dim float32 tensor. ``kl_divergence``, ``logit_mse``,
``probability_mse`` and ``feature_mse`` take an optional padding ``mask`` for per-token tensors (``_position_mean``): (B, T),
bool or 0/1 (``_require_binary``: other values are refused; a bool mask is taken unchecked, with no device sync).

``projection_head`` builds the small trainable module that maps a student
feature batch onto the shape of a stored teacher feature, or returns ``None``
when the shapes already agree.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdcache.errors import ShapeMismatchError

__all__ = [
    "kl_divergence",
    "topk_logits",
    "topk_kl_divergence",
    "check_topk_classes",
    "logit_mse",
    "probability_mse",
    "feature_mse",
    "cross_entropy",
    "top1_matches",
    "top1_correct",
    "top1_agreement",
    "topk_top1_matches",
    "topk_top1_correct",
    "projection_head",
    "MapHead",
    "LinearHead",
    "PooledLinearHead",
    "MapToTokensHead",
    "TokensToMapHead",
]


# --------------------------------------------------------------------------- checks


def _require_tensors(what: str, **given: object) -> None:
    """Refuse an argument that is not a ``torch.Tensor`` (None stands for an optional mask) in one line naming it: a numpy
    array, ``store.read``'s rows passed as they are, failed inside torch with ``'numpy.ndarray' object has no attribute
    'detach'``."""
    for name, value in given.items():
        if value is not None and not isinstance(value, Tensor):
            shape = f" of shape {tuple(value.shape)}" if hasattr(value, "shape") else ""
            raise TypeError(f"{what}: {name} must be a torch.Tensor, got {type(value).__module__}.{type(value).__qualname__}{shape}; "
                            "convert it with torch.as_tensor(...) (store.read and read_shards return numpy arrays)")


def _require_same_shape(student: Tensor, teacher: Tensor, what: str, fix: str) -> None:
    """Raise ``ShapeMismatchError`` unless ``student`` and ``teacher`` have equal shapes."""
    if student.shape != teacher.shape:
        raise ShapeMismatchError(
            f"{what}: student shape {tuple(student.shape)} does not match teacher shape "
            f"{tuple(teacher.shape)}; {fix}"
        )


def _require_logits(student_logits: Tensor, teacher_logits: Tensor, what: str) -> None:
    """Logits must be (B, C) or (B, ..., C) and equal in shape."""
    if student_logits.ndim < 2 or teacher_logits.ndim < 2:
        raise ShapeMismatchError(
            f"{what}: logits must have shape (B, C) or (B, ..., C), a class axis last, got student shape "
            f"{tuple(student_logits.shape)} and teacher shape {tuple(teacher_logits.shape)}; a regression output (one value "
            "per sample, shape (B,), in both teacher and student) is distilled with logit_mse alone (train.loss.mse, "
            "mse_on = \"logits\", kl = 0)"
        )
    topk = ""  # a top-k store's values (fewer than the student's classes, at the same positions) passed as full logits
    if student_logits.shape[:-1] == teacher_logits.shape[:-1] and teacher_logits.shape[-1] < student_logits.shape[-1]:
        topk = ("; or, where the teacher's are a top-k store's values (targets.topk: the batch also holds their classes, "
                "targets/logits_indices), use topk_kl_divergence(student_logits, values, classes) or topk_top1_matches")
    _require_same_shape(
        student_logits,
        teacher_logits,
        what,
        f"make the student's output layer produce {teacher_logits.shape[-1]} classes "
        f"over the same batch/token positions as the teacher{topk}",
    )


# --------------------------------------------------------------------------- padding masks


def _outside_zeroed(student: Tensor, teacher: Tensor, mask: Tensor, what: str) -> tuple[Tensor, Tensor, Tensor]:
    """``student`` and ``teacher`` (B, T, C) with every position the (B, T) ``mask`` leaves out set to 0, and the mask as
    bool: a pad position then gives a loss of exactly 0 and no gradient, whatever it held (a huge, inf or NaN logit)."""
    if student.ndim != 3 or tuple(mask.shape) != tuple(student.shape[:2]):
        raise ShapeMismatchError(
            f"{what}: mask shape {tuple(mask.shape)} does not fit shape {tuple(student.shape)}; a mask is (B, T), true where a "
            "position counts, for per-token (B, T, C) logits or (B, T, D) features"
        )
    if mask.dtype != torch.bool:  # a bool mask (train's) is taken as it is: no check on the device, no wait for it
        _require_binary(mask, what)
    valid = mask.to(student.device, torch.bool)
    keep = valid.unsqueeze(-1)
    return torch.where(keep, student, 0), torch.where(keep, teacher.detach(), 0), valid


def _require_binary(mask: Tensor, what: str) -> None:
    """Refuse a mask of other values than 0 and 1 (a float mask of weights, a count, NaN): each counted as true, a wrong
    loss with no word. One check per call (on a GPU mask, one device sync: pass a bool mask to have none)."""
    odd = odd_mask_value(mask)
    if odd is not None:
        raise ValueError(f"{what}: mask must hold bool or 0/1 values (true where a position counts), got {odd} "
                         f"({str(mask.dtype).removeprefix('torch.')}); pass mask != 0 for a padding mask (a loss weights "
                         "every valid position alike: a mask of weights is not one)")


def odd_mask_value(mask: Tensor) -> str | None:
    """None where ``mask`` is bool or holds 0 and 1 alone, else its first other value (``repr``; "complex values"). An
    integer mask (an attention mask, checked as each training batch is made) is told by its least and greatest values: a quarter
    of the time of comparing each value with 0 and 1."""
    if mask.dtype == torch.bool or mask.numel() == 0:
        return None
    if mask.is_complex():
        return "complex values"
    if not mask.is_floating_point():
        least, most = torch.aminmax(mask)
        if bool((least >= 0) & (most <= 1)):
            return None
    elif bool(((mask == 0) | (mask == 1)).all()):
        return None
    return repr(mask[(mask != 0) & (mask != 1)][0].item())


def _position_mean(per_position: Tensor, mask: Tensor | None) -> Tensor:
    """The mean of per-position losses: over every position without ``mask``; with a (B, T) ``mask``, each row's mean
    over its valid positions (a row with none adds 0), then the mean over the B rows. Rows are the unit torchrun's ranks
    and ``train.streams`` average over, so K equal parts of a batch averaged give the whole batch's value.

    Args:
        per_position: (B·T,) or (B, T) losses, 0 at positions outside ``mask`` (``_outside_zeroed``).
        mask: bool (B, T), or None.
    """
    if mask is None:
        return per_position.mean()
    valid = mask.to(per_position.dtype)
    return ((per_position.reshape(mask.shape) * valid).sum(1) / valid.sum(1).clamp(min=1)).mean()


# --------------------------------------------------------------------------- losses


def kl_divergence(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0, mask: Tensor | None = None) -> Tensor:
    """Temperature-scaled KL(p_teacher || p_student) (Hinton et al. 2015).

    ``p = softmax(logits / T)`` over the last dimension; the divergence is summed
    over classes, averaged over every other position and multiplied by ``T**2`` so
    gradient magnitudes stay comparable across temperatures.

    Args:
        student_logits: (B, C) or (B, ..., C), any float dtype.
        teacher_logits: same shape as ``student_logits``; may be float16. Treated
            as a constant target (detached).
        temperature: T > 0.
        mask: optional (B, T) bool or 0/1 for (B, T, C) per-token logits, true where a position counts: each row's
            mean over its valid positions, then the mean over rows (``_position_mean``).

    Returns:
        0-dim float32 tensor, computed in float64 where T² · ln C > 1000 (float32 would lose it; ``_kl_cast``).
    """
    _require_tensors("kl_divergence", student_logits=student_logits, teacher_logits=teacher_logits, mask=mask)
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(
            f"kl_divergence: temperature must be a finite number > 0, got {temperature!r}; "
            "use e.g. temperature=1.0 (plain KL) or 2.0-4.0 (softer targets)"
        )
    _require_logits(student_logits, teacher_logits, "kl_divergence")
    if mask is not None:
        student_logits, teacher_logits, mask = _outside_zeroed(student_logits, teacher_logits, mask, "kl_divergence")
    num_classes = student_logits.shape[-1]
    cast = _kl_cast(num_classes, temperature)
    log_p_s = F.log_softmax(cast(student_logits).reshape(-1, num_classes) / temperature, dim=-1)
    log_p_t = F.log_softmax(cast(teacher_logits.detach()).reshape(-1, num_classes) / temperature, dim=-1)
    p_t = log_p_t.exp()
    # Classes the teacher gives zero probability (e.g. -inf logits) contribute 0, not 0 * inf = nan.
    terms = torch.where(p_t > 0, p_t * (log_p_t - log_p_s), torch.zeros_like(p_t))
    return (_position_mean(terms.sum(dim=-1), mask) * (temperature**2)).float()


def topk_logits(values: Tensor, classes: Tensor, num_classes: int) -> Tensor:
    """Top-k teacher logits (a store's ``targets.topk``) as full logits: each position's K stored values at their stored
    classes, ``-inf`` at every other class. ``kl_divergence`` against them is KL(p || q) with p = softmax(values / T) over
    the K stored classes alone (the teacher's mass outside its top K taken as zero, p renormalised over the K) and
    log q = log_softmax(student / T) over every class, at those classes; with K = C it is the full logits' divergence,
    bit for bit (the same values in class order). Top-1 metrics count the stored classes' ties.

    Args:
        values: (B, ..., K), any float dtype.
        classes: int tensor of ``values``' shape, each in ``[0, num_classes)``, distinct per position.
        num_classes: C >= K, the teacher's (and the student's) class count.

    Returns:
        (B, ..., C) tensor of ``values``' dtype.
    """
    _require_tensors("topk_logits", values=values, classes=classes)
    _require_topk(values, classes, "topk_logits")
    check_topk_classes(classes, num_classes, "topk_logits")
    full = values.new_full((*values.shape[:-1], num_classes), float("-inf"))
    return full.scatter(-1, classes.long(), values)


def topk_kl_divergence(student_logits: Tensor, values: Tensor, classes: Tensor, temperature: float = 1.0,
                       mask: Tensor | None = None, num_classes: int | None = None) -> Tensor:
    """``kl_divergence`` against top-k teacher logits (a store's ``targets.topk``) without spreading them over the classes:
    KL(p || q), p = softmax(values / T) over the K stored classes (renormalised: the teacher's mass outside its top K taken
    as zero), log q = log_softmax(student / T) over all C classes, gathered at those K. The same value as ``kl_divergence``
    against ``topk_logits(values, classes, C)``, and bit for bit the full logits' divergence when K = C (the K terms are
    summed in class order), while the teacher's side holds (B, ..., K), not (B, ..., C): for a language model's 128k
    vocabulary, the full-logits path's teacher temporaries are several student-logit-sized tensors.

    Args:
        student_logits: (B, ..., C), any float dtype.
        values, classes: (B, ..., K) the stored top-k values (any float dtype; detached) and their classes (int), each in
            ``[0, C)`` and distinct per position (``check_topk_classes`` checks both: on a CUDA tensor an index out of
            range is a device-side assert, so check the host copy first).
        temperature, mask: as ``kl_divergence``'s.
        num_classes: the teacher's class count C (a store's ``Target.classes``), which the student's last axis must
            match; None: not checked (a student of fewer classes than a stored class fails in the gather).

    Returns:
        0-dim float32 tensor (float64 inside where ``kl_divergence`` would be).
    """
    _require_tensors("topk_kl_divergence", student_logits=student_logits, values=values, classes=classes, mask=mask)
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"topk_kl_divergence: temperature must be a finite number > 0, got {temperature!r}; use e.g. 1.0")
    _require_topk(values, classes, "topk_kl_divergence")
    if student_logits.ndim < 2 or student_logits.shape[:-1] != values.shape[:-1] or student_logits.shape[-1] < values.shape[-1]:
        raise ShapeMismatchError(f"topk_kl_divergence: student shape {tuple(student_logits.shape)} does not fit the teacher's top-k "
                                 f"values {tuple(values.shape)}; make the student's output layer produce the teacher's classes over the "
                                 "same batch/token positions")
    if num_classes is not None and student_logits.shape[-1] != num_classes:  # fewer: an index error; more: never trained
        raise ShapeMismatchError(f"topk_kl_divergence: student shape {tuple(student_logits.shape)} does not match the teacher's "
                                 f"{num_classes} classes (top {values.shape[-1]} stored per position); make the student's output "
                                 f"layer produce {num_classes} classes over the same batch/token positions as the teacher")
    if mask is not None:
        student_logits, values, mask = _outside_zeroed(student_logits, values, mask, "topk_kl_divergence")
    order = classes.argsort(dim=-1)  # the K terms in class order: K = C sums them as kl_divergence does
    values, classes = values.gather(-1, order), classes.gather(-1, order).long()
    num_classes, k = student_logits.shape[-1], values.shape[-1]
    cast = _kl_cast(num_classes, temperature)
    log_q = F.log_softmax(cast(student_logits).reshape(-1, num_classes) / temperature, dim=-1).gather(-1, classes.reshape(-1, k))
    log_p = F.log_softmax(cast(values.detach()).reshape(-1, k) / temperature, dim=-1)
    p = log_p.exp()
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
    return (_position_mean(terms.sum(dim=-1), mask) * (temperature**2)).float()


def _require_topk(values: Tensor, classes: Tensor, what: str) -> None:
    if values.shape != classes.shape or values.ndim < 2:
        raise ShapeMismatchError(f"{what}: values {tuple(values.shape)} and classes {tuple(classes.shape)} must be one shape (B, ..., K)")


def check_topk_classes(classes: Tensor, num_classes: int, what: str = "top-k logits") -> None:
    """Refuse stored top-k ``classes`` outside ``[0, num_classes)`` (a damaged store, or one of another teacher), or a class
    repeated within a position (its probability would count twice). Meant for the host copy: on a GPU tensor, device syncs."""
    if classes.numel() and (int(classes.min()) < 0 or int(classes.max()) >= num_classes):
        raise ShapeMismatchError(f"{what}: stored classes run from {int(classes.min())} to {int(classes.max())}, outside the "
                                 f"{num_classes} classes; the store is damaged (kdcache verify names it) or not of this teacher")
    # numpy's sort of many short rows: a batch of 16,384 positions × 64 classes in 2.4 ms, torch's in 11-13 ms (CPU)
    repeated = (np.diff(np.sort(classes.detach().cpu().numpy(), axis=-1), axis=-1) == 0).any(axis=-1)
    if repeated.any():
        raise ShapeMismatchError(f"{what}: a class repeated within a position at {int(repeated.sum())} positions (a position's "
                                 "top-k classes are distinct: its probability would count twice); the store is damaged "
                                 "(kdcache verify names its rows)")


# T² · ln C above which kl_divergence computes in float64: float32's absolute error stays of order 1e-5 up to here
# (measured: 2e-5 for logits of spread 1-20 over 10 to 22,000 classes, 6e-5 over 50,000).
_KL_FLOAT32_LIMIT = 1000.0


def _kl_cast(num_classes: int, temperature: float) -> Callable[[Tensor], Tensor]:
    """``Tensor.double`` where float32 would lose the divergence, else ``Tensor.float`` (as fast as ever).

    ``log p_t - log p_s`` is the difference of two numbers near ``-ln C``, each rounded by about 6e-8 · ln C, while a
    high temperature flattens both distributions and leaves a divergence of order 1/T²: the error of ``T² · KL`` grows
    as 6e-8 · T² · ln C (off by 3 % at T = 1000 over 50,000 classes, the gradient by 1e-4 to 1e-2).
    """
    return Tensor.double if temperature**2 * math.log(max(num_classes, 1)) > _KL_FLOAT32_LIMIT else Tensor.float


def logit_mse(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean squared error between logits, computed in float32.

    Args:
        student_logits: (B, C) or (B, ..., C); or (B,) for a regression output, one value per sample.
        teacher_logits: same shape; detached.
        mask: optional (B, T) bool or 0/1 for (B, T, C) per-token logits, true where a position counts.

    Returns:
        0-dim float32 tensor, mean over all elements; with ``mask``, each position's mean over classes averaged as
        ``_position_mean`` does.
    """
    _require_tensors("logit_mse", student_logits=student_logits, teacher_logits=teacher_logits, mask=mask)
    if student_logits.ndim == 1 and teacher_logits.ndim == 1:  # regression: squared error needs no class axis
        _require_same_shape(student_logits, teacher_logits, "logit_mse", "make the student give one value per sample of the batch")
    else:
        _require_logits(student_logits, teacher_logits, "logit_mse")
    return _squared_error(student_logits, teacher_logits, mask, "logit_mse")


def _squared_error(student: Tensor, teacher: Tensor, mask: Tensor | None, what: str) -> Tensor:
    """The mean squared error in float32 of two tensors of equal shape, masked as ``_position_mean`` says where ``mask``."""
    if mask is None:
        return F.mse_loss(student.float(), teacher.detach().float())
    student, teacher, mask = _outside_zeroed(student, teacher, mask, what)
    return _position_mean((student.float() - teacher.float()).square().mean(dim=-1), mask)


def probability_mse(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0, mask: Tensor | None = None) -> Tensor:
    """Squared error between the softened class probabilities ``p = softmax(logits / T)``, summed over classes and
    averaged over every other position (a Brier score against the teacher's distribution), computed in float32.
    Unlike ``logit_mse`` it ignores what softmax ignores (a constant added to a row's logits) and, unlike
    ``kl_divergence``, it is bounded (at most 2 a row), so a confident teacher's near-zero probabilities weigh little.

    Args:
        student_logits: (B, C) or (B, ..., C).
        teacher_logits: same shape; detached.
        temperature: T > 0.
        mask: optional (B, T) bool or 0/1 for (B, T, C) per-token logits, true where a position counts
            (``_position_mean``).

    Returns:
        0-dim float32 tensor.
    """
    _require_tensors("probability_mse", student_logits=student_logits, teacher_logits=teacher_logits, mask=mask)
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"probability_mse: temperature must be a finite number > 0, got {temperature!r}; use e.g. 1.0 or 4.0")
    _require_logits(student_logits, teacher_logits, "probability_mse")
    if mask is not None:
        student_logits, teacher_logits, mask = _outside_zeroed(student_logits, teacher_logits, mask, "probability_mse")
    num_classes = student_logits.shape[-1]
    p_s = F.softmax(student_logits.float().reshape(-1, num_classes) / temperature, dim=-1)
    p_t = F.softmax(teacher_logits.detach().float().reshape(-1, num_classes) / temperature, dim=-1)
    return _position_mean((p_s - p_t).square().sum(dim=-1), mask)


def feature_mse(student_features: Tensor, teacher_features: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean squared error between feature tensors, computed in float32.

    Args:
        student_features: (B, *shape), already projected to the teacher's shape.
        teacher_features: (B, *shape), exactly the same shape; detached.
        mask: optional (B, T) bool or 0/1 for (B, T, D) per-token features, true where a position counts.

    Returns:
        0-dim float32 tensor, mean over all elements; with ``mask``, each position's mean over D averaged as
        ``_position_mean`` does.
    """
    _require_tensors("feature_mse", student_features=student_features, teacher_features=teacher_features, mask=mask)
    _require_same_shape(
        student_features,
        teacher_features,
        "feature_mse",
        "pass the student features through projection_head(student_shape, teacher_shape) first",
    )
    return _squared_error(student_features, teacher_features, mask, "feature_mse")


def cross_entropy(student_logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy against hard labels, computed in float32. A label below 0 (torchvision's ``-1`` for STL-10's
    unlabeled split, Hugging Face's ``-100``) is no label: its position adds 0, so the mean is the labeled positions'
    sum over every position (a batch without a label gives 0; K equal parts averaged give the whole batch's value, so
    torchrun's ranks and ``train.streams`` agree).

    Args:
        student_logits: (B, C) or (B, ..., C).
        labels: int64 class indices of shape ``student_logits.shape[:-1]``, i.e. (B,)
            for (B, C) logits; < 0 for none.

    Returns:
        0-dim float32 tensor, mean over all positions.
    """
    _require_tensors("cross_entropy", student_logits=student_logits, labels=labels)
    if student_logits.ndim < 2 or labels.shape != student_logits.shape[:-1]:
        raise ShapeMismatchError(
            f"cross_entropy: labels shape {tuple(labels.shape)} does not fit logits shape "
            f"{tuple(student_logits.shape)}; labels must have the logits' shape without the "
            "last (class) dimension, e.g. (B,) for (B, C) logits"
        )
    if labels.dtype != torch.int64:
        raise ValueError(
            f"cross_entropy: labels must be int64 class indices, got dtype {labels.dtype}; "
            "convert with labels.long()"
        )
    num_classes = student_logits.shape[-1]
    labels = labels.reshape(-1)
    # ignore_index takes one value, and "mean" divides by the labeled positions; below, any negative is that value and the
    # sum is divided by all. An ignored position adds exactly 0 (not 0 * its loss: inf where its class 0 logit is -inf)
    ignored = labels.where(labels >= 0, -100)
    return F.cross_entropy(student_logits.float().reshape(-1, num_classes), ignored, ignore_index=-100, reduction="sum") / labels.numel()


# Top-1 metrics. Stored float16 teacher logits tie at the top far more often than float32 ones (float16 keeps 11 bits), and
# argmax gives a tie's lowest class, so a metric counted by argmax would depend on how the classes are numbered. Each
# metric below is instead its expected value when every tie is broken uniformly at random: a position whose top class
# is one of k tied ones counts 1/k where the other side names it (both sides tied: shared / (k_student · k_teacher)).


def _top_classes(logits: Tensor) -> Tensor:
    """(..., C) -> bool (..., C): the classes tied at each position's maximum (none where the maximum is NaN)."""
    return logits == logits.amax(dim=-1, keepdim=True)


@torch.no_grad()
def top1_matches(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Per position, how far the student's top class is the teacher's: ``|S ∩ T| / (|S| · |T|)`` for the sets S and T of
    classes tied at each side's maximum, the chance that they agree when ties are broken at random (1 or 0 without ties).

    Args:
        student_logits: (B, C) or (B, ..., C).
        teacher_logits: same shape; may be float16 (its ties as stored).

    Returns:
        float64 tensor of shape ``student_logits.shape[:-1]``, values in [0, 1] (no gradient).
    """
    _require_tensors("top1_matches", student_logits=student_logits, teacher_logits=teacher_logits)
    _require_logits(student_logits, teacher_logits, "top1_matches")
    s, t = _top_classes(student_logits), _top_classes(teacher_logits.to(student_logits.device))
    return (s & t).sum(-1).double() / (s.sum(-1) * t.sum(-1)).clamp(min=1)


@torch.no_grad()
def top1_correct(logits: Tensor, labels: Tensor) -> Tensor:
    """Per position, how far the top class is the label: ``1/k`` where the label is one of the k classes tied at the
    maximum, else 0 (and 0 for a label outside ``[0, C)``, such as ``-1`` for none).

    Args:
        logits: (B, C) or (B, ..., C).
        labels: int64 class indices of shape ``logits.shape[:-1]``.

    Returns:
        float64 tensor of the labels' shape (no gradient).
    """
    _require_tensors("top1_correct", logits=logits, labels=labels)
    top, labels = _top_classes(logits), labels.to(logits.device, torch.int64)
    inside = (labels >= 0) & (labels < logits.shape[-1])
    hit = top.gather(-1, labels.where(inside, 0).unsqueeze(-1)).squeeze(-1) & inside
    return hit.double() / top.sum(-1).clamp(min=1)


def _require_topk_of(student_logits: Tensor, values: Tensor, classes: Tensor, num_classes: int, what: str) -> None:
    """Top-k teacher logits (``values``, ``classes``: (B, ..., K) of ``num_classes``) against ``student_logits``: as
    ``_require_logits`` against the full logits they stand for, (B, ..., num_classes); their classes checked."""
    _require_topk(values, classes, what)
    _require_logits(student_logits, values.new_empty(()).expand(*values.shape[:-1], num_classes), what)
    check_topk_classes(classes, num_classes, what)


@torch.no_grad()
def topk_top1_matches(student_logits: Tensor, values: Tensor, classes: Tensor, num_classes: int) -> Tensor:
    """``top1_matches`` against top-k teacher logits (a store's ``targets.topk``) without spreading them over the classes:
    equal to ``top1_matches(student_logits, topk_logits(values, classes, num_classes))`` where the stored values are
    finite (a store's are: extract refuses others; a position's K values all -inf tie its K classes here, every class
    there), T the stored classes tied at the largest stored value, with no (B, ..., C) teacher tensor made (a language
    model's vocabulary per token).

    Args:
        student_logits: (B, ..., C), C = ``num_classes``.
        values, classes: (B, ..., K), as ``topk_logits`` takes them (``classes`` on the host: checked there).

    Returns:
        float64 tensor of shape ``student_logits.shape[:-1]``, values in [0, 1] (no gradient).
    """
    _require_tensors("topk_top1_matches", student_logits=student_logits, values=values, classes=classes)
    _require_topk_of(student_logits, values, classes, num_classes, "topk_top1_matches")
    values, classes = values.to(student_logits.device), classes.to(student_logits.device, torch.int64)
    t, top = _top_classes(values), student_logits.amax(dim=-1, keepdim=True)
    both = (t & (student_logits.gather(-1, classes) == top)).sum(-1)
    return both.double() / ((student_logits == top).sum(-1) * t.sum(-1)).clamp(min=1)


@torch.no_grad()
def topk_top1_correct(values: Tensor, classes: Tensor, labels: Tensor) -> Tensor:
    """``top1_correct`` of top-k teacher logits, equal to ``top1_correct(topk_logits(values, classes, C), labels)`` where
    the values are finite (as ``topk_top1_matches``; ``classes`` checked by the caller: ``check_topk_classes``): ``1/k``
    where the label is one of the k stored classes tied at the largest stored value, else 0.

    Args:
        values, classes: (B, ..., K).
        labels: int64 class indices of shape ``values.shape[:-1]``.

    Returns:
        float64 tensor of the labels' shape (no gradient).
    """
    _require_tensors("topk_top1_correct", values=values, classes=classes, labels=labels)
    _require_topk(values, classes, "topk_top1_correct")
    t = _top_classes(values)
    hit = (t & (classes.to(torch.int64) == labels.to(classes.device, torch.int64).unsqueeze(-1))).any(-1)
    return hit.double() / t.sum(-1).clamp(min=1)


@torch.no_grad()
def top1_agreement(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Fraction of positions whose student and teacher top classes agree, a tie counted as ``top1_matches`` does.

    Args:
        student_logits: (B, C) or (B, ..., C).
        teacher_logits: same shape.

    Returns:
        0-dim float32 tensor in [0, 1] (no gradient).
    """
    _require_tensors("top1_agreement", student_logits=student_logits, teacher_logits=teacher_logits)
    return top1_matches(student_logits, teacher_logits).mean().float()


# --------------------------------------------------------------------------- heads


def _check_input(x: Tensor, expected: tuple[int, ...], description: str) -> None:
    """Raise ``ShapeMismatchError`` unless ``x`` is (B, *expected)."""
    if tuple(x.shape[1:]) != expected:
        raise ShapeMismatchError(
            f"projection head ({description}) expected a student batch of shape (B, *{expected}), "
            f"got {tuple(x.shape)}; feed it the layer output it was built for"
        )


class MapHead(nn.Module):
    """(B, C, H, W) -> (B, C', H', W'): optional 1x1 conv, then spatial resampling.

    A dimension larger than the teacher's is pooled (``adaptive_avg_pool2d``), then one smaller is interpolated
    (bilinear, align_corners=False): interpolating a dimension down by 3 or more would read a few of its positions and
    leave the others out of the loss. Nothing where the sizes already agree.
    """

    def __init__(self, student_shape: tuple[int, int, int], teacher_shape: tuple[int, int, int]) -> None:
        super().__init__()
        (c_in, h_in, w_in), (c_out, h_out, w_out) = student_shape, teacher_shape
        self.student_shape = tuple(student_shape)
        self.teacher_shape = tuple(teacher_shape)
        self.out_size = (h_out, w_out)
        self.conv: nn.Module = nn.Conv2d(c_in, c_out, kernel_size=1) if c_in != c_out else nn.Identity()
        self.pool_size = (min(h_in, h_out), min(w_in, w_out))  # each larger dimension pooled to the teacher's size
        self.pool = self.pool_size != (h_in, w_in)
        self.interpolate = self.pool_size != (h_out, w_out)  # then each smaller one interpolated up
        parts = [f"1x1 conv {c_in}->{c_out}"] if c_in != c_out else []
        if self.pool:
            parts.append(f"adaptive avg pool {h_in}x{w_in}->{self.pool_size[0]}x{self.pool_size[1]}")
        if self.interpolate:
            parts.append(f"interpolate {self.pool_size[0]}x{self.pool_size[1]}->{h_out}x{w_out}")
        self.description = " + ".join(parts)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C', H', W')."""
        _check_input(x, self.student_shape, self.description)
        x = self.conv(x)
        if self.pool:
            x = F.adaptive_avg_pool2d(x, self.pool_size)
        if self.interpolate:
            x = F.interpolate(x, size=self.out_size, mode="bilinear", align_corners=False)
        return x

    def extra_repr(self) -> str:
        return f"description={self.description!r}"


class LinearHead(nn.Module):
    """(B, D) -> (B, D') or (B, T, D) -> (B, T, D'): a Linear on the last dimension."""

    def __init__(self, student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.student_shape = tuple(student_shape)
        self.teacher_shape = tuple(teacher_shape)
        self.linear = nn.Linear(student_shape[-1], teacher_shape[-1])
        self.description = f"linear {student_shape[-1]}->{teacher_shape[-1]}"
        if len(student_shape) == 2:
            self.description += f" per token (T={student_shape[0]})"

    def forward(self, x: Tensor) -> Tensor:
        """(B, *student_shape) -> (B, *teacher_shape)."""
        _check_input(x, self.student_shape, self.description)
        return self.linear(x)

    def extra_repr(self) -> str:
        return f"description={self.description!r}"


class PooledLinearHead(nn.Module):
    """(B, C, H, W) -> (B, D): global average pool, then Linear(C, D)."""

    def __init__(self, student_shape: tuple[int, int, int], teacher_shape: tuple[int]) -> None:
        super().__init__()
        (c_in, h_in, w_in), (d_out,) = student_shape, teacher_shape
        self.student_shape = tuple(student_shape)
        self.teacher_shape = tuple(teacher_shape)
        self.linear = nn.Linear(c_in, d_out)
        self.description = f"global avg pool {h_in}x{w_in} + linear {c_in}->{d_out}"

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, D)."""
        _check_input(x, self.student_shape, self.description)
        return self.linear(x.mean(dim=(2, 3)))

    def extra_repr(self) -> str:
        return f"description={self.description!r}"


def _token_grid(tokens: int, like: tuple[int, int]) -> tuple[int, int] | None:
    """The (rows, columns) patch grid of ``tokens`` tokens in row-major order: the map's own ``like`` when it has that
    many positions, else a square; None when neither fits (a class token left in, a non-square grid)."""
    if like[0] * like[1] == tokens:
        return like
    side = math.isqrt(tokens)
    return (side, side) if side * side == tokens else None


class MapToTokensHead(nn.Module):
    """(B, C, H, W) -> (B, T, D), a CNN student's map onto a ViT teacher's patch tokens: ``MapHead`` onto the teacher's
    patch grid (``T = H·W`` as it is, else a square ``√T × √T``) with D channels, then the grid read out row-major as
    tokens, the order a ViT's patch embedding (``Conv2d`` then ``flatten(2).transpose(1, 2)``) gives them."""

    def __init__(self, student_shape: tuple[int, int, int], teacher_shape: tuple[int, int], grid: tuple[int, int]) -> None:
        super().__init__()
        self.student_shape = tuple(student_shape)
        self.teacher_shape = tuple(teacher_shape)
        self.map = MapHead(student_shape, (teacher_shape[1], *grid))
        self.description = " + ".join([*filter(None, [self.map.description]), f"{grid[0]}x{grid[1]} grid as {teacher_shape[0]} tokens"])

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, T, D)."""
        _check_input(x, self.student_shape, self.description)
        return self.map(x).flatten(2).transpose(1, 2)

    def extra_repr(self) -> str:
        return f"description={self.description!r}"


class TokensToMapHead(nn.Module):
    """(B, T, D) -> (B, C, H, W), a ViT student's patch tokens onto a CNN teacher's map: the tokens laid out row-major
    on their patch grid (``T = H·W`` of the teacher's map as it is, else a square ``√T × √T``) as a D-channel map,
    then ``MapHead`` onto the teacher's shape."""

    def __init__(self, student_shape: tuple[int, int], teacher_shape: tuple[int, int, int], grid: tuple[int, int]) -> None:
        super().__init__()
        self.student_shape = tuple(student_shape)
        self.teacher_shape = tuple(teacher_shape)
        self.grid = grid
        self.map = MapHead((student_shape[1], *grid), teacher_shape)
        self.description = " + ".join([f"{student_shape[0]} tokens as a {grid[0]}x{grid[1]} grid", *filter(None, [self.map.description])])

    def forward(self, x: Tensor) -> Tensor:
        """(B, T, D) -> (B, C, H, W)."""
        _check_input(x, self.student_shape, self.description)
        return self.map(x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *self.grid))

    def extra_repr(self) -> str:
        return f"description={self.description!r}"


# How to fix an unsupported pair, by the teacher's rank (the teacher target is the fixed side).
_FIX_BY_TEACHER_RANK = {
    1: "hook a student layer whose output is a (C, H, W) map or a (D,) vector (from (T, D) tokens, a train.features select "
       "step picks one: \"0\", a class token, or \"mean\")",
    2: "hook a student layer whose output is a (T, D) token sequence with the teacher's T, or a (C, H, W) map",
    3: "hook a student layer whose output is a (C, H, W) map or (T, D) patch tokens",
}


def projection_head(
    student_shape: tuple[int, ...], teacher_shape: tuple[int, ...], *, name: str = ""
) -> nn.Module | None:
    """Build the trainable head mapping student features onto a teacher feature shape.

    Args:
        student_shape: per-sample student shape (no batch dim).
        teacher_shape: per-sample teacher shape (no batch dim).
        name: target name, used in error messages.

    Returns:
        ``None`` when the shapes are equal, else a module mapping (B, *student_shape)
        to (B, *teacher_shape) with a ``description`` string attribute:

        - (C, H, W) -> (C', H', W'): ``MapHead``
        - (D,) -> (D',) and (T, D) -> (T, D'): ``LinearHead``
        - (C, H, W) -> (D,): ``PooledLinearHead``
        - (C, H, W) -> (T, D): ``MapToTokensHead``; (T, D) -> (C, H, W): ``TokensToMapHead`` (T patch tokens on a
          grid: the map's H·W, else a square)

    Raises:
        ShapeMismatchError: for any other pair (e.g. vector -> map, token counts
            that differ, rank 4+), or non-positive dimensions.
    """
    student_shape, teacher_shape = tuple(int(d) for d in student_shape), tuple(int(d) for d in teacher_shape)
    label = f"target {name!r}" if name else "target"
    if any(d <= 0 for d in student_shape + teacher_shape):
        raise ShapeMismatchError(
            f"{label}: shapes must have positive dimensions, got student {student_shape} and "
            f"teacher {teacher_shape}; pass per-sample shapes without the batch dimension"
        )
    if student_shape == teacher_shape:
        return None
    ranks = (len(student_shape), len(teacher_shape))
    if ranks == (3, 3):
        return MapHead(student_shape, teacher_shape)
    if ranks == (1, 1):
        return LinearHead(student_shape, teacher_shape)
    if ranks == (2, 2):
        if student_shape[0] != teacher_shape[0]:
            raise ShapeMismatchError(
                f"{label}: student token sequence {student_shape} has {student_shape[0]} tokens but "
                f"teacher {teacher_shape} has {teacher_shape[0]}; feed the student the same token "
                "count (sequence length / patch grid) as the teacher"
            )
        return LinearHead(student_shape, teacher_shape)
    if ranks == (3, 1):
        return PooledLinearHead(student_shape, teacher_shape)
    if ranks in ((3, 2), (2, 3)):
        return _grid_head(student_shape, teacher_shape, label)
    fix = _FIX_BY_TEACHER_RANK.get(
        len(teacher_shape),
        "capture a teacher layer whose output is a (C, H, W) map, a (D,) vector or a (T, D) token sequence",
    )
    raise ShapeMismatchError(
        f"{label}: no projection from student shape {student_shape} to teacher shape {teacher_shape}; {fix}"
    )


def _grid_head(student_shape: tuple[int, ...], teacher_shape: tuple[int, ...], label: str) -> nn.Module:
    """``MapToTokensHead`` for a (C, H, W) student onto (T, D) teacher tokens, ``TokensToMapHead`` for (T, D) student tokens
    onto a (C, H, W) teacher: the tokens laid on the map's H·W positions, else a square grid. ``ShapeMismatchError``
    (``label``: the target) when T is neither, naming the select step that keeps the patch tokens alone."""
    ranks = (len(student_shape), len(teacher_shape))
    (tokens, _), (_, h, w) = (teacher_shape, student_shape) if ranks == (3, 2) else (student_shape, teacher_shape)
    grid = _token_grid(tokens, (h, w))
    if grid is None:
        if ranks == (3, 2):
            side, fix = "teacher's", "extract the teacher's patch tokens alone ([targets.select] step \"1:\" drops a leading class token)"
        else:
            side, fix = "student's", "select the student's patch tokens alone (train.features select step \"1:\" drops a leading class token)"
        raise ShapeMismatchError(
            f"{label}: no projection from student shape {student_shape} to teacher shape {teacher_shape}: the {side} "
            f"{tokens} tokens are neither the map's {h}x{w} positions nor a square patch grid; {fix}"
        )
    if ranks == (3, 2):
        return MapToTokensHead(student_shape, teacher_shape, grid)
    return TokensToMapHead(student_shape, teacher_shape, grid)
