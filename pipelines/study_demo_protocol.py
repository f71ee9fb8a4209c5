"""Hyper-parameter study for the MNIST demo protocol, in plain torch (no kdcache import).

Replicates what the demo does with kdcache:

* teacher logits for all 50,000 train inputs, computed once and rounded to float16
  (kdcache stores targets as float16);
* three students of the same architecture (784-H-10 MLP), same initial weights,
  same optimizer (AdamW), lr, weight decay, cosine schedule over the same number of
  optimizer steps, same batch size and seed. The details follow kdcache.train exactly:
  torch.manual_seed(seed) before building the student; the subset is
  sort(default_rng(seed).permutation(50000)[:1000]); each epoch's order is
  default_rng([seed, epoch]).permutation(rows), cut into consecutive batches (the last
  one short); the lr factor is 0.5 (1 + cos(pi step / steps)), no warm-up:

  A. cross-entropy on a seeded 1,000-image subset of train (first 1,000 of a
     seeded permutation) -- the "few labels" baseline;
  B. KL(teacher || student) at temperature T, times T^2, on all 50,000 train
     inputs, no labels -- distillation from the cached logits;
  C. cross-entropy on all 50,000 train labels -- the "all labels" reference.

Reports test accuracy (10,000 test split) of teacher, A, B, C and
gap_closed = (B - A) / (teacher - A).

    python pipelines/study_demo_protocol.py                     # recommended setting
    python pipelines/study_demo_protocol.py --hidden 48 --temperature 4 --steps 1500
    python pipelines/study_demo_protocol.py --grid              # a wider grid (several minutes)

Findings (test accuracy %, teacher 99.05; H = 50, weight decay 0.01, exact kdcache protocol;
seconds = the three students together, 1 thread, on a shared 2-core CPU). The first row is kdcache's rule since
0.1.9, weight decay on matrices only (this script's); the others were measured with decay on every parameter,
biases too (kdcache <= 0.1.8's):

    T  lr    batch steps seeds  A            B            C            gap_closed     max|C-B|  s
    2  1e-2  256   2000  0-4    89.0-90.1    97.13-97.37  97.09-97.56  0.802-0.819    0.43      9-24
    2  1e-2  256   2000  0-4    89.0-90.1    97.17-97.45  97.16-97.39  0.801-0.827    0.29      13-19
    4  1e-2  256   2000  0-4    89.0-90.1    96.88-97.28  97.16-97.39  0.767-0.814    0.28      13-17
    2  3e-3  256   4000  0-4    88.9-89.5    97.14-97.42  97.08-97.65  0.800-0.839    0.37      21-45
    2  5e-3  256   3000  0-2    88.9-89.5    97.20-97.35  97.25-97.38  0.807-0.833    0.18      19-37
    4  3e-3  128   4000  0-2    89.2-89.8    96.97-97.09  97.35-97.54  0.774-0.800    0.45      15-33
    2  3e-3  128   4000  0-2    89.2-89.8    97.10-97.27  97.35-97.54  0.792-0.818    0.27      20-33

T = 2 (1.5-3) did as well as or better than T = 4 and clearly better than 8 (the teacher's
logits reach |171|; softer targets seem harder for a 50-unit MLP to match); lr 1e-3 was worse
everywhere; H = 40 or 53 moved B by < 0.35 points; runs of about 5 epochs (1000 x 256 or 2000 x 128) closed only
0.43-0.77 of the gap. Two training threads on the shared (busy) 2-core machine made timings
erratic (4000 steps: 4 s to 123 s); one thread was much steadier for this MLP. The
recommended setting (the defaults) reproduces `kdcache demo` (whose pipeline has T = 2)
to the hundredth: A 89.20, B 97.18, C 97.28, gap_closed 0.81.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mnist  # noqa: E402  (pipelines/mnist.py)

# The recommended demo setting (see data/README.md and the study's report).
RECOMMENDED = dict(hidden=50, temperature=2.0, lr=1e-2, batch_size=256, steps=2000, weight_decay=0.01,
                   subset=1000, seed=0)

TARGETS = dict(b_minus_a=5.0, c_minus_b_abs=0.5, gap_closed=0.75)


def whole_split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x float32 (N,1,28,28) normalised exactly as mnist.dataset does, y int64 (N,))."""
    ds = mnist.dataset(split)
    items = ds.__getitems__(range(len(ds)))
    x = torch.stack([i[0] for i in items])
    y = torch.stack([i[1] for i in items])
    return x, y


@torch.no_grad()
def predict(model: torch.nn.Module, x: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)])


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return 100.0 * (predict(model, x).argmax(1) == y).float().mean().item()


def kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, t: float) -> torch.Tensor:
    """Same definition as kdcache.losses.kl_divergence: sum over classes, mean over batch, x T^2."""
    log_p_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).mean() * (t * t)


def cosine(total_steps: int):
    """kdcache.train's cosine factor: 0.5 (1 + cos(pi * step / total)), no warm-up, down to 0."""
    return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(1, total_steps)))


def subset_rows(n: int, subset: int, seed: int) -> np.ndarray:
    """kdcache.train's seeded subset: the first ``subset`` of a seeded permutation, sorted."""
    return np.sort(np.random.default_rng(seed).permutation(n)[:subset])


def epoch_order(rows: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """kdcache.cache's in-memory epoch order: a permutation seeded by (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(rows)


def train_student(kind: str, rows: np.ndarray, data: dict, cfg: dict) -> tuple[torch.nn.Module, float, float]:
    """Train one student on train ``rows``; returns (model, seconds, last batch loss).

    ``kind`` is "ce" (labels) or "kl" (the float16 teacher logits). Batches are consecutive
    slices of each epoch's order, the last one possibly short (kdcache: drop_last=False).
    """
    x, y, tl = data["train_x"], data["train_y"], data["teacher_logits"]
    torch.manual_seed(cfg["seed"])                      # same initial weights for A, B, C
    model = mnist.student(cfg["hidden"])
    # kdcache.train decays matrices and kernels only (ndim >= 2), not biases (kdcache <= 0.1.8 decayed every parameter)
    params = list(model.parameters())
    opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg["weight_decay"]},
                             {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}], lr=cfg["lr"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine(cfg["steps"]))
    bs, step, epoch = cfg["batch_size"], 0, 0
    loss = torch.tensor(float("nan"))
    model.train()
    t0 = time.perf_counter()
    while step < cfg["steps"]:
        order = torch.from_numpy(epoch_order(rows, cfg["seed"], epoch))
        for start in range(0, len(order), bs):
            if step >= cfg["steps"]:
                break
            idx = order[start:start + bs]
            out = model(x[idx])
            loss = kl_loss(out, tl[idx], cfg["temperature"]) if kind == "kl" else F.cross_entropy(out, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
        epoch += 1
    return model, time.perf_counter() - t0, loss.item()


def run_setting(cfg: dict, data: dict, memo: dict | None = None) -> dict:
    """Train A, B, C for ``cfg``; A and C do not depend on T, so a grid may reuse them via ``memo``."""
    memo = {} if memo is None else memo
    n = len(data["train_x"])
    everything = np.arange(n)
    res = {k: cfg[k] for k in ("hidden", "temperature", "lr", "batch_size", "steps", "weight_decay", "seed")}
    res["params"] = sum(p.numel() for p in mnist.student(cfg["hidden"]).parameters())
    res["epochs_full"] = round(cfg["steps"] * cfg["batch_size"] / n, 2)
    for name, kind, rows in (("A", "ce", subset_rows(n, cfg["subset"], cfg["seed"])),
                             ("B", "kl", everything),
                             ("C", "ce", everything)):
        key = (name, *(cfg[k] for k in sorted(cfg) if not (kind == "ce" and k == "temperature")))
        if key not in memo:
            model, secs, _ = train_student(kind, rows, data, cfg)
            memo[key] = (round(accuracy(model, data["test_x"], data["test_y"]), 2), round(secs, 1))
        res[name], res[f"t{name}"] = memo[key]
    res["teacher"] = data["teacher_acc"]
    res["B-A"] = round(res["B"] - res["A"], 2)
    res["C-B"] = round(res["C"] - res["B"], 2)
    res["gap_closed"] = round((res["B"] - res["A"]) / (res["teacher"] - res["A"]), 3)
    res["t_total"] = round(res["tA"] + res["tB"] + res["tC"], 1)
    res["meets"] = (res["B-A"] >= TARGETS["b_minus_a"] and abs(res["C-B"]) <= TARGETS["c_minus_b_abs"]
                    and res["gap_closed"] >= TARGETS["gap_closed"])
    return res


def prepare(threads: int) -> dict:
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    train_x, train_y = whole_split("train")
    test_x, test_y = whole_split("test")
    t1 = time.perf_counter()
    teacher = mnist.teacher()
    logits = predict(teacher, train_x, batch=500).to(torch.float16)  # stored as float16 by kdcache
    t2 = time.perf_counter()
    teacher_acc = round(accuracy(teacher, test_x, test_y), 2)
    agree = 100.0 * (logits.float().argmax(1) == train_y).float().mean().item()
    print(f"data load {t1 - t0:.1f}s, teacher logits on 50k train {t2 - t1:.1f}s; "
          f"teacher test acc {teacher_acc:.2f}%, train acc {agree:.2f}%, "
          f"max |logit| {logits.float().abs().max().item():.1f}", flush=True)
    return dict(train_x=train_x.flatten(1).contiguous(), train_y=train_y, test_x=test_x, test_y=test_y,
                teacher_logits=logits, teacher_acc=teacher_acc)


COLUMNS = ["hidden", "params", "temperature", "lr", "batch_size", "steps", "epochs_full", "weight_decay", "seed",
           "teacher", "A", "B", "C", "B-A", "C-B", "gap_closed", "tA", "tB", "tC", "t_total", "meets"]


def print_row(res: dict, header: bool = False) -> None:
    if header:
        print(" | ".join(COLUMNS), flush=True)
    print(" | ".join(str(res[c]) for c in COLUMNS), flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for key, val in RECOMMENDED.items():
        ap.add_argument(f"--{key.replace('_', '-')}", type=type(val), default=val)
    ap.add_argument("--threads", type=int, default=2, help="torch threads for the teacher pass (default 2)")
    ap.add_argument("--train-threads", type=int, default=1,
                    help="torch threads while training the students "
                         "(default 1, as pipelines/mnist.toml's train.threads)")
    ap.add_argument("--grid", action="store_true", help="run the study's grid instead of one setting")
    ap.add_argument("--json", type=Path, default=None, help="append one JSON line per setting here")
    args = ap.parse_args(argv)
    base = {k: getattr(args, k) for k in RECOMMENDED}

    data = prepare(args.threads)
    torch.set_num_threads(args.train_threads)
    if args.grid:
        settings = [dict(base, temperature=t, lr=lr, batch_size=bs, steps=s)
                    for lr, bs, s, t in itertools.product((1e-3, 3e-3, 1e-2), (128, 256), (2000, 4000),
                                                          (2.0, 4.0, 8.0))]
        settings += [dict(base, hidden=h, temperature=t) for h in (40, 53) for t in (2.0, 4.0)]
        settings += [dict(base, seed=s) for s in (1, 2, 3, 4)]
    else:
        settings = [base]
    ok, memo = True, {}
    for i, cfg in enumerate(settings):
        res = run_setting(cfg, data, memo)
        print_row(res, header=(i == 0))
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(res) + "\n")
        ok = ok and res["meets"]
    if not args.grid:
        print(f"targets: B-A >= {TARGETS['b_minus_a']}, |C-B| <= {TARGETS['c_minus_b_abs']}, "
              f"gap_closed >= {TARGETS['gap_closed']}: {'MET' if ok else 'NOT MET'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
