"""3. Training input and 4. online vs cached, on the real MNIST pipeline (pretrained CNN teacher, MLP student).

3: epoch time of ``kdcache.train`` from the store ÷ the same student loop with its targets already
   in RAM as tensors (same dataset for inputs, student, optimizer and LR schedule, KL loss, batch size, threads),
   for the store in memory and forced to stream (``memory_budget_mb = 0``). Goal <= 1.10.
4: epoch time training against the live teacher (forward per step, then the same student step)
   ÷ the cached epoch, next to the ideal (t_teacher + t_student) / t_student. Goal >= 0.95 x ideal.
Epoch times are medians over epochs after the first, then the median over repeats. The first epoch
is warm-up, and in kdcache it also checks every row's input fingerprint (later epochs re-check the
seeded ``train.fingerprint_recheck`` fraction); its ratio is printed too, without a goal.

    python benchmarks/bench_train.py [--device cuda] [--check] [--out train.json]
"""

from __future__ import annotations

import json
import statistics
import time

import numpy as np
import torch
from torch.utils.data import default_collate

import importlib

import harness
import kdcache
from kdcache import data, losses, store as layout

trainer = importlib.import_module("kdcache.train")  # the module (kdcache.train is also the function)


def main() -> None:
    p = harness.parser(__doc__.splitlines()[0])
    p.add_argument("--split", default="val", help="MNIST split to distil on (val: 10,000 real images)")
    p.add_argument("--epochs", type=int, default=4)
    args = p.parse_args()
    epochs = 3 if args.quick else args.epochs
    work = harness.workdir(args)
    report = harness.Report("train", args)
    base = dict(device=args.device)
    pipe = harness.mnist_pipeline(data={"split": args.split}, targets={"layers": []}, extract=base)
    store = str(work / "mnist.zarr")
    kdcache.extract(pipe, store, overwrite=True)
    t = pipe.train
    print(f"training input: MNIST {args.split} ({layout.open_store(store).num_samples} real images), "
          f"batch {t.batch_size}, {epochs} epochs, threads {t.threads}, {args.device}")
    dataset = pipe.resolve(pipe.data.factory)(args.split)
    targets = torch.from_numpy(layout.open_store(store).read(layout.LOGITS, 0, len(dataset)))  # the same values, in RAM
    teacher = pipe.resolve(pipe.teacher.factory)().to(args.device)
    device = torch.device(args.device)

    def kd(mode: str, mode_budget: float) -> float:
        train = {"epochs": epochs, "steps": 0, "eval_split": "", "eval_every": 0, "memory_budget_mb": mode_budget, "device": args.device}
        pipeline = harness.mnist_pipeline(data={"split": args.split}, targets={"layers": []}, extract=base, train=train)
        out = work / "student"
        kdcache.train(pipeline, store, out, overwrite=True)
        seconds = [m["seconds"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]
        first[mode].append(seconds[0])
        return statistics.median(np.diff(seconds))  # epochs 2.. (the first is warm-up, and hashes every row)

    def loop(online: bool = False, student_step: bool = True) -> float:
        """The plain loop: inputs from the dataset, targets from RAM (or the live teacher); median epoch after the first."""
        torch.manual_seed(t.seed)
        student = pipe.resolve(pipe.student.factory)().to(device)
        optimizer = trainer._optimizer(t.optimizer, list(student.parameters()), t.lr, t.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, trainer._schedule(t.schedule, epochs * -(-len(dataset) // t.batch_size)))
        times = []
        with data.torch_threads(t.threads):
            for epoch in range(epochs):
                start = time.perf_counter()
                order = np.random.default_rng([t.seed, epoch]).permutation(len(dataset))
                for lo in range(0, len(order), t.batch_size):
                    idx = order[lo : lo + t.batch_size]
                    x = default_collate([data.inputs_of(item) for item in dataset.__getitems__(idx.tolist())]).to(device, non_blocking=True)
                    if online:
                        with torch.inference_mode():
                            target = teacher(x).half()
                        target = target.clone()
                    else:
                        target = targets[idx].to(device, non_blocking=True)
                    if student_step:
                        loss = losses.kl_divergence(student(x), target, t.loss.temperature)
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        optimizer.step()
                        schedule.step()
                harness.sync(args.device)
                times.append(time.perf_counter() - start)
        if not online and student_step:
            first["ram"].append(times[0])
        return statistics.median(times[1:])

    runs: dict[str, list[float]] = {k: [] for k in ("ram", "memory", "stream", "online", "teacher", "inputs")}
    first: dict[str, list[float]] = {k: [] for k in ("ram", "memory", "stream")}
    for r in range(args.repeats):
        runs["ram"].append(loop())
        runs["memory"].append(kd("memory", 2048.0))
        runs["stream"].append(kd("stream", 0.0))
        runs["online"].append(loop(online=True))
        runs["teacher"].append(loop(online=True, student_step=False))
        runs["inputs"].append(loop(student_step=False))
    e = {k: statistics.median(v) for k, v in runs.items()}
    for k, v in e.items():
        report.figure(f"epoch_s.{k}", v)
    report.figure("ratio_in_memory_vs_ram", e["memory"] / e["ram"])
    report.figure("ratio_streaming_vs_ram", e["stream"] / e["ram"])
    f = {k: statistics.median(v) for k, v in first.items()}
    report.figure("first_epoch_ratio_in_memory", f["memory"] / f["ram"], "(includes warm-up; every row's fingerprint checked)")
    report.figure("first_epoch_ratio_streaming", f["stream"] / f["ram"], "(includes warm-up; every row's fingerprint checked)")
    t_student, t_teacher = e["ram"], max(0.0, e["teacher"] - e["inputs"])  # the teacher's forwards alone
    ideal = (t_teacher + t_student) / t_student
    measured = e["online"] / e["memory"]
    report.figure("online_vs_cached", measured)
    report.figure("online_vs_cached_ideal", ideal, "(t_teacher + t_student) / t_student")
    report.goal("3. train in-memory / targets in RAM", e["memory"] / e["ram"], "<=", 1.10)
    report.goal("3. train streaming / targets in RAM", e["stream"] / e["ram"], "<=", 1.10)
    report.goal("4. (online / cached) / ideal", measured / ideal, ">=", 0.95)
    report.finish()


if __name__ == "__main__":
    main()
