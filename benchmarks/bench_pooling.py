"""9. Pooling by a padding mask: what ``targets.mask`` costs extract and ``train.mask`` costs a training step.

The text example's language model (pipelines/text.py ``TinyLM``; ``models.text_teacher``: 2 layers of ``--width``, and
``models.text_student``: 1 layer of half that) over seeded random sentences of ``--tokens`` // 8 to ``--tokens`` tokens,
right-padded to ``--tokens`` positions (``models.sentences``). Each ratio is the median of per-round ratios (a round runs
every arm once, in turn), printed with its range.

- extract: ``kdcache.extract`` of the per-token logits, ``final_norm`` by ``mean`` and ``encoder.layers.0`` by ``last``
  with ``targets.mask`` ÷ the same run without a mask (``mean`` over every position, ``-1``): whole calls, no goal
  (fixed costs and all; this box's noise is +-5 %). The pooling itself, timed on one batch's hooked outputs (the mask's
  checks, ``mean`` and ``last`` with the mask minus ``mean`` and ``-1`` without) ÷ that batch's teacher forward: goal <= 0.03.
- train: a training step of the student (forward; its ``final_norm`` pooled by ``mean`` through a linear head against a
  pooled target, plus a next-token loss on every position; backward; Adam) with its ``mean`` by ``train.mask`` (the
  mask's checks and the pooling, as ``kdcache.train`` runs them: ``Padding.of``, ``student_feature``) ÷ the same step
  without a mask: whole steps, no goal (+-30 % on this box). The pooling's forward and backward alone, with the mask
  minus without, ÷ the unmasked step: goal <= 0.03. Each timing is the median of ``--steps`` calls.
- launches: the pooling's device ops (not views; counted on meta copies of the outputs, so the mask's host ops are left
  out), which on a GPU are about one kernel launch each, at the batch and at batch 8: goal <= 1.25 x (a per-sample
  reduction's launches grow with the batch, ~5 a sample forward and backward: a GPU's step pays ~5 us a launch).

    python benchmarks/bench_pooling.py [--device cuda] [--batch-size 64] [--tokens 128] [--width 256] [--check] [--out pooling.json]
"""

from __future__ import annotations

import contextlib
import shutil
import statistics
from typing import Any, Callable

import torch

import harness
import kdcache
import models
from kdcache import data, teacher as teachers
from kdcache.pipeline import from_dict
from kdcache.train import student_feature
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

MASKED = {"final_norm": "mean", "encoder.layers.0": "last"}  # with targets.mask = "attention_mask"
UNMASKED = {"final_norm": "mean", "encoder.layers.0": "-1"}  # the same selects over every position


def pipeline(n: int, masked: bool, device: str, extract: dict[str, Any]) -> Any:
    return from_dict({
        "teacher": {"factory": "models.py:text_teacher"},
        "data": {"factory": "models.py:sentences", "split": str(n)},
        "targets": {"logits": True, "layers": list(MASKED), "dtype": "float16", "select": MASKED if masked else UNMASKED,
                    "mask": "attention_mask" if masked else ""},
        "extract": {"device": device, **extract},
    }, root=harness.HERE, source="benchmarks/bench_pooling.py")


def first_batch(n: int, size: int) -> dict[str, Any]:
    """Sentences 0..size-1 as ``kdcache`` collates them (``inputs``, ``index``)."""
    return data.collate(data.Indexed(models.sentences(str(n)), None).__getitems__(list(range(size))))


def extract_figures(report: harness.Report, args: Any, n: int, extract: dict[str, Any]) -> None:
    work = harness.workdir(args)
    stores = {arm: work / f"{arm}.zarr" for arm in ("masked", "unmasked")}
    pipelines = {arm: pipeline(n, arm == "masked", args.device, extract) for arm in stores}
    rounds = harness.interleaved({arm: lambda arm=arm: kdcache.extract(pipelines[arm], str(stores[arm]), overwrite=True)
                                  for arm in stores}, args.repeats, args.device,
                                 cleanup=lambda: [shutil.rmtree(s, ignore_errors=True) for s in stores.values()])
    whole = lambda r: r["masked"] / r["unmasked"]  # noqa: E731
    report.figure("extract.masked_vs_unmasked", harness.median_of(rounds, whole), harness.spread(rounds, whole) + " (no goal)")

    device = torch.device(args.device)
    model = models.text_teacher().to(device)
    batch = first_batch(n, extract["batch_size"])
    inputs = data.to_device(batch["inputs"], device)
    bf16 = extract["precision"] == "bf16" and device.type == "cuda"
    autocast = torch.autocast("cuda", torch.bfloat16) if bf16 else contextlib.nullcontext()  # as extract runs it
    with torch.inference_mode(), autocast, teachers.capture(model, tuple(MASKED)) as hooked:
        model(**inputs)
        outputs = dict(hooked)  # the timed forwards below hook theirs anew, as extract's do

        def forward() -> None:
            hooked.clear()
            model(**inputs)

        def pool(masked: bool, hooked: dict[str, torch.Tensor] = outputs) -> None:
            mask = teachers.Padding.of(batch, "attention_mask", "targets.mask", "bench") if masked else None
            for layer, selector in (MASKED if masked else UNMASKED).items():
                teachers.select(hooked[layer], selector, layer, mask=mask)

        times = steps({"forward": forward, "masked": lambda: pool(True), "unmasked": lambda: pool(False)},
                      args.steps, args.repeats, args.device)
        counted = {arm: launches(lambda meta, arm=arm: pool(arm == "masked", meta), outputs) for arm in ("masked", "unmasked")}
    cost = lambda r: (r["masked"] - r["unmasked"]) / r["forward"]  # noqa: E731
    for arm in ("forward", "masked", "unmasked"):
        report.figure(f"extract.{arm}_ms", 1e3 * harness.median_of(times, lambda r, arm=arm: r[arm]),
                      "(one batch: the teacher's forward)" if arm == "forward" else f"(one batch's pooling, {arm})")
    report.figure("extract.pooling_cost_vs_forward", harness.median_of(times, cost), harness.spread(times, cost))
    report.goal("extract: masked pooling's extra time / teacher forward", harness.median_of(times, cost), "<=", 0.03)
    for arm, value in counted.items():
        report.figure(f"extract.pool_{arm}_launches", value, "(one batch's device ops: kernel launches on a GPU)")


def train_figures(report: harness.Report, args: Any, n: int, size: int) -> None:
    device = torch.device(args.device)
    torch.manual_seed(0)
    student = models.text_student().to(device)
    width = models.TEXT["width"]
    head = torch.nn.Linear(width // 2, width).to(device)  # what kdcache adds for a feature of another width
    optimizer = torch.optim.Adam([*student.parameters(), *head.parameters()], lr=1e-4)
    batch = first_batch(n, size)
    inputs = data.to_device(batch["inputs"], device)
    target = torch.randn(size, width, device=device)
    with teachers.capture(student, ("final_norm",)) as hooked:

        def step(masked: bool) -> None:
            hooked.clear()
            logits = student(**inputs)
            pooled = student_feature(hooked, "final_norm", "final_norm", "mean", padding(batch, masked))
            loss = torch.nn.functional.mse_loss(head(pooled), target) + \
                torch.nn.functional.cross_entropy(logits.flatten(0, 1), inputs["input_ids"].flatten())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        step(False)
        hidden = hooked["final_norm"].detach()  # (B, T, width / 2): the step's pooled features, pooled alone below

        def pool(masked: bool, part: dict[str, Any] = batch, features: torch.Tensor = hidden) -> None:
            value = features[:len(part["index"])].clone().requires_grad_()
            student_feature({"final_norm": value}, "final_norm", "final_norm", "mean", padding(part, masked)).sum().backward()

        times = steps({"masked": lambda: step(True), "unmasked": lambda: step(False), "pool_masked": lambda: pool(True),
                       "pool_unmasked": lambda: pool(False)}, args.steps, args.repeats, args.device)
        few = first_batch(n, 8)
        counted = {f"train.pool_{arm}_launches": launches(lambda meta, arm=arm: pool(arm == "masked", features=meta), hidden)
                   for arm in ("masked", "unmasked")}
        counted["train.pool_masked_launches_batch_8"] = launches(lambda meta: pool(True, few, meta), hidden)
    ratio = lambda r: r["masked"] / r["unmasked"]  # noqa: E731
    cost = lambda r: (r["pool_masked"] - r["pool_unmasked"]) / r["unmasked"]  # noqa: E731
    for arm in times[0]:
        report.figure(f"train.{arm}_ms", 1e3 * harness.median_of(times, lambda r, arm=arm: r[arm]),
                      "(the pooling's forward and backward alone)" if arm.startswith("pool") else "(a training step)")
    report.figure("train.masked_vs_unmasked", harness.median_of(times, ratio), harness.spread(times, ratio) + " (whole steps, no goal)")
    report.figure("train.pooling_cost_vs_step", harness.median_of(times, cost), harness.spread(times, cost))
    report.goal("train: masked pooling's extra time / training step", harness.median_of(times, cost), "<=", 0.03)
    for key, value in counted.items():
        report.figure(key, value, "(device ops, forward and backward: kernel launches on a GPU)")
    report.goal(f"train: masked pooling's launches at batch {size} / at batch 8", counted["train.pool_masked_launches"] /
                counted["train.pool_masked_launches_batch_8"], "<=", 1.25)


def padding(batch: dict[str, Any], masked: bool) -> teachers.Padding | None:
    """The batch's ``train.mask`` as ``kdcache.train`` takes it (checked, on the host), or none."""
    return teachers.Padding.of(batch, "attention_mask", "train.mask", "bench") if masked else None


class _Launches(TorchDispatchMode):
    """Counts the ops on the meta device that are not views (a view launches no kernel)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        leaves = tree_leaves((args, kwargs or {}))
        if not func.is_view and any(getattr(x, "type", None) == "meta" or getattr(x, "is_meta", False) for x in leaves):
            self.count += 1
        return func(*args, **(kwargs or {}))


def launches(pool: Callable[[Any], Any], value: Any) -> int:
    """The device ops (not views) ``pool`` dispatches on ``value`` (a tensor or a dict of them), its backward's included:
    run on meta copies, so that the mask's host ops (on the CPU) are told apart. On a GPU each is about one kernel launch,
    what a per-sample loop multiplies by the batch."""
    meta = {k: v.to("meta") for k, v in value.items()} if isinstance(value, dict) else value.to("meta")
    with _Launches() as counter:
        pool(meta)
    return counter.count


def steps(fns: dict[str, Callable[[], Any]], count: int, repeats: int, device: str) -> list[dict[str, float]]:
    """Seconds of each function per call: ``harness.interleaved`` rounds of ``count`` calls in turn each, the median call."""
    calls = harness.interleaved(fns, count * repeats, device)
    return [{name: statistics.median(c[name] for c in calls[i * count:(i + 1) * count]) for name in fns} for i in range(repeats)]


def main() -> None:
    p = harness.parser(__doc__.splitlines()[0], repeats=5)
    harness.add_extract_options(p)
    p.add_argument("--tokens", type=int, default=0, help="positions per sentence (default 128; --quick 32)")
    p.add_argument("--width", type=int, default=0, help="the teacher's width (default 256; --quick 64); the student's is half")
    p.add_argument("--n", type=int, default=0, help="sentences per extract run (default 4 batches)")
    p.add_argument("--steps", type=int, default=5, help="calls per round of each timed step (the median one is taken)")
    args = p.parse_args()
    extract = harness.extract_options(args)
    if args.quick:
        extract["batch_size"] = args.batch_size or 16
    models.TEXT.update(tokens=args.tokens or (32 if args.quick else 128), width=args.width or (64 if args.quick else 256))
    n = args.n or 4 * extract["batch_size"]
    report = harness.Report("pooling", args)
    print(f"pooling by a padding mask: text LM width {models.TEXT['width']}, {models.TEXT['tokens']} tokens, batch "
          f"{extract['batch_size']}, n={n}, {args.device}, {extract['precision']}")
    for key, value in (("batch_size", extract["batch_size"]), ("tokens", models.TEXT["tokens"]), ("width", models.TEXT["width"]), ("n", n)):
        report.figure(key, value)
    extract_figures(report, args, n, extract)
    train_figures(report, args, n, extract["batch_size"])
    report.finish()


if __name__ == "__main__":
    main()
