"""The CUDA paths: skipped without a GPU (CI has none); ``benchmarks/gpu_check.sh`` runs them on the device machine.

On a GPU, extract converts on the device, copies into pinned memory without blocking and gathers shards in a
writer thread; train moves batches to the device from a pinned DataLoader. Each test compares with the CPU
path, which the rest of the suite pins down: the sample columns must be byte-identical (alignment does not
depend on the device) and the values equal within the device's arithmetic.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import kdcache
from kdcache.cli import main
from reference import FIXTURES, make_pipeline, read_store, train_cut_after_first_epoch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SAMPLE_COLUMNS = ("samples/index", "samples/fingerprint", "samples/label", "progress/done")


def extract_on(device: str, out: Path, *overrides: str) -> tuple[dict, dict[str, np.ndarray]]:
    info = kdcache.extract(make_pipeline(f'extract.device="{device}"', *overrides), str(out))
    assert info["complete"], info
    return read_store(out)


def check_extract_matches_cpu(device: str, tmp_path: Path, *overrides: str, rtol: float = 1e-2) -> None:
    _, cpu = extract_on("cpu", tmp_path / "cpu.zarr", *overrides)
    manifest, dev = extract_on(device, tmp_path / "device.zarr", *overrides)
    assert dev.keys() == cpu.keys()
    for path in SAMPLE_COLUMNS:
        assert np.array_equal(dev[path], cpu[path]), f"{path} differs on {device}"
    assert np.array_equal(dev["samples/index"], np.arange(len(dev["samples/index"])))
    for path in (p for p in cpu if p.startswith("targets/")):
        assert dev[path].dtype == cpu[path].dtype, path
        a, b = dev[path].astype(np.float64), cpu[path].astype(np.float64)
        scale = np.abs(b).mean() + 1e-6
        assert np.all(np.abs(a - b) <= rtol * (np.abs(b) + scale)), f"{path}: max difference {np.abs(a - b).max():.3g} on {device}"
    # the zoo teacher's logits encode each row's own index: exact on any device, so no row was misplaced
    assert np.array_equal(dev["targets/logits"][:, 0].astype(np.int64), dev["samples/index"])
    assert manifest["pipeline"]["extract"]["device"] == device


@pytest.mark.parametrize("overrides", [(), ("extract.batch_size=3", "extract.rows_per_shard=8"), ("extract.num_workers=2",)],
                         ids=["default", "batches-cut-shards", "dataloader-workers"])
def test_cuda_extract_equals_the_cpu_extract(tmp_path, overrides):
    check_extract_matches_cpu("cuda", tmp_path, *overrides)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second CUDA device")
def test_an_extract_on_a_second_gpu_equals_the_cpu_extract(tmp_path):
    """cuda:1 is not the current device: the event the writer waits on must be recorded on that device's stream, where
    the copies into pinned memory were queued, or it reads them before they land (an earlier batch's values)."""
    check_extract_matches_cpu("cuda:1", tmp_path, "extract.batch_size=3", "extract.rows_per_shard=8")


def test_cuda_extract_under_bf16_autocast_keeps_rows_aligned(tmp_path):
    """bf16 changes the values (checked loosely: 3 significant bits of difference allowed), never the rows."""
    check_extract_matches_cpu("cuda", tmp_path, 'extract.precision="bf16"', rtol=6e-2)


def test_cuda_dry_run_sees_the_overflow_of_its_batch():
    """The dry run reads its batch's targets once the device's asynchronous copies into pinned memory have landed: the
    float16 overflow the run would stop on is named on a GPU as on the CPU (not read from memory not yet written)."""
    with pytest.raises(kdcache.KdcacheError, match=r"target 'amp' \(rows 0\.\.31\) has values beyond the float16 range"):
        kdcache.dry_run(make_pipeline('extract.device="cuda"', "teacher.factory=extract_zoo.py:overflow_layer", "targets.layers=['amp']",
                                      "extract.batch_size=32"))


def tensors_in(value: object) -> list[torch.Tensor]:
    """Every tensor in a checkpoint's nested dicts, lists and tuples."""
    if isinstance(value, torch.Tensor):
        return [value]
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list | tuple) else ()
    return [t for item in items for t in tensors_in(item)]


def check_train_matches_cpu(device: str, tmp_path: Path, tiny_store: str, precision: str = "fp32", rtol: float = 5e-2) -> None:
    """``precision``: the device run's train.precision (the CPU run's is fp32)."""
    losses = {}
    for where, out, p in (("cpu", tmp_path / "run-cpu", "fp32"), (device, tmp_path / "run-device", precision)):
        result = CliRunner().invoke(main, ["train", str(FIXTURES / "tiny.toml"), "--cache", tiny_store, "--out", str(out),
                                           "--set", f'train.device="{where}"', "--set", "train.epochs=3", "--no-progress",
                                           "--set", f'train.precision="{p}"'])
        assert result.exit_code == 0, result.output
        lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert len(lines) == 3 and all(np.isfinite(v) for m in lines for k, v in m.items() if k.startswith("loss"))
        losses[out.name] = [m["loss_kl"] for m in lines]
        state = torch.load(out / "student.pt", weights_only=True)
        assert all(t.device.type == "cpu" for t in state.values())  # saved loadable anywhere
        checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)  # no map_location: CUDA tensors would load onto the GPU
        assert tensors_in(checkpoint["optimizer"]["state"]) and all(t.device.type == "cpu" for t in tensors_in(checkpoint)), \
            "checkpoint.pt holds device tensors: torch.load fails on a machine without a GPU"  # a --resume moves them back
    np.testing.assert_allclose(losses["run-device"], losses["run-cpu"], rtol=rtol)  # same batches, same seed: the same curve
    if precision == "fp16":  # the loss scale is saved for a resume
        assert "scaler" in torch.load(tmp_path / "run-device" / "checkpoint.pt", weights_only=True)


def test_cuda_train_follows_the_cpu_curve(tmp_path, tiny_store):
    check_train_matches_cpu("cuda", tmp_path, tiny_store)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_train_in_autocast_follows_the_cpu_curve(tmp_path, tiny_store, precision):
    """train.precision on a GPU: tensor-core autocast, the curve of fp32 on the CPU within reduced precision's error."""
    check_train_matches_cpu("cuda", tmp_path, tiny_store, precision, rtol=0.15)


def test_cuda_eval_against_an_eval_store_scores_as_the_cpu(tmp_path, tiny_store):
    """train.eval_cache on a GPU: the student's logits are on the device, the stored teacher logits on the host
    (losses.top1_matches moves them to the student's device), the counts summed on the host. The teacher's accuracy
    is the stored logits' alone: equal to the CPU run's; the student's figures within the device's arithmetic."""
    from conftest import extract_tiny

    test_store = extract_tiny(tmp_path / "test.zarr", 'data.split="test"')
    lines = {}
    for where in ("cpu", "cuda"):
        p = kdcache.load_pipeline(FIXTURES / "tiny.toml", [f"train.device='{where}'", f"train.eval_cache='{test_store}'", "train.epochs=2"])
        kdcache.train(p, tiny_store, tmp_path / where)
        lines[where] = json.loads((tmp_path / where / "metrics.jsonl").read_text().splitlines()[-1])
    cpu, gpu = lines["cpu"], lines["cuda"]
    assert gpu["eval_teacher_accuracy"] == cpu["eval_teacher_accuracy"]
    for key in ("eval_accuracy", "eval_agreement"):
        assert isinstance(gpu[key], float) and gpu[key] == pytest.approx(cpu[key], abs=0.1), key


def test_cuda_resume_with_dropout_reaches_the_uninterrupted_weights(tmp_path, tiny_store):
    """Dropout on a GPU draws from the CUDA generator: a checkpoint saves its state and a resume restores it."""
    p = kdcache.load_pipeline(FIXTURES / "tiny.toml", ["train.device='cuda'", "student.factory='bad_input.py:dropping'",
                                                       "train.features={}", "train.epochs=3"])
    kdcache.train(p, tiny_store, tmp_path / "whole")
    train_cut_after_first_epoch(p, tiny_store, tmp_path / "cut")
    assert isinstance(torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["rng"], dict)  # CPU and CUDA states
    torch.cuda.manual_seed_all(12345)  # whatever the generators hold now: the resumed run must not depend on it
    kdcache.train(p, tiny_store, tmp_path / "cut", resume=True)
    got, want = (torch.load(tmp_path / run / "student.pt", weights_only=True) for run in ("cut", "whole"))
    for k in want:  # other dropout masks move weights by ~1e-2; cuDNN's backward may differ in the last bits
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5, msg=k)


def test_cuda_sigterm_mid_epoch_resumes_to_the_uninterrupted_weights(tmp_path, tiny_store, monkeypatch):
    """SIGTERM inside an epoch on a GPU (a DataLoader with pinned memory serves the batches): the checkpoint saved
    there holds the CUDA generator's state and the epoch's loss sums (read off the device once, there); the resumed
    epoch serves its remaining batches and reaches the uninterrupted run's weights."""
    import os
    import signal

    from kdcache.errors import TrainingStopped
    from kdcache.train import Run

    p = kdcache.load_pipeline(FIXTURES / "tiny.toml", ["train.device='cuda'", "student.factory='bad_input.py:dropping'",
                                                       "train.features={}", "train.eval_split=''", "train.epochs=3"])
    kdcache.train(p, tiny_store, tmp_path / "whole")
    calls, losses_of = iter(range(1, 10**9)), Run.losses

    def step(self, batch):
        if next(calls) == 10:
            os.kill(os.getpid(), signal.SIGTERM)
        return losses_of(self, batch)

    monkeypatch.setattr(Run, "losses", step)
    with pytest.raises(TrainingStopped, match=r"stopped by SIGTERM in epoch 1 after batch 3 \(step 10 of 21\)"):
        kdcache.train(p, tiny_store, tmp_path / "cut")
    monkeypatch.undo()
    assert isinstance(torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["rng"], dict)  # CPU and CUDA states
    kdcache.train(p, tiny_store, tmp_path / "cut", resume=True)
    got, want = (torch.load(tmp_path / run / "student.pt", weights_only=True) for run in ("cut", "whole"))
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5, msg=k)
    losses = [[json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()] for run in ("cut", "whole")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


@pytest.mark.parametrize("select", ["0.0", "0.1:", "0.mean", "0.transpose"], ids=["class-token", "patch-tokens", "mean", "transpose"])
def test_cuda_select_steps_store_the_cpu_rows(tmp_path, select):
    """Select steps run on the device, before the pinned copy: a slice or a transpose is a view that is not contiguous,
    and the copy must still write each sample's own rows (compared with the CPU extract of the same ViT-like teacher)."""
    from kdcache.pipeline import from_dict
    from kdcache.store import layer_path

    def extracted(device: str) -> np.ndarray:
        raw = {"teacher": {"factory": "architectures.py:vit_teacher"}, "data": {"factory": "architectures.py:images"},
               "targets": {"layers": ["blocks.1.attn"], "dtype": "float32", "select": {"blocks.1.attn": select}},
               "extract": {"batch_size": 8, "device": device, "rows_per_shard": 8}}
        out = tmp_path / f"{device}.zarr"
        kdcache.extract(from_dict(raw, root=FIXTURES), str(out))
        return kdcache.open_store(str(out)).read(layer_path("blocks.1.attn"), 0, 20)

    cpu, gpu = extracted("cpu"), extracted("cuda")
    assert gpu.shape == cpu.shape
    np.testing.assert_allclose(gpu, cpu, rtol=1e-2, atol=1e-3)


def test_a_masked_mean_on_cuda_is_the_cpus_bits_in_any_batch():
    """teacher._valid_mean (targets.mask's, train.mask's ``mean``) on the device: gathers, zeros, float32 adds of two values
    and one division per sample, each exact IEEE arithmetic whatever the kernel's shape: a sentence's mean is the same bits
    on the GPU, in a batch of 64 or of 3, right or left padded, as on the CPU, and so is its gradient."""
    from kdcache.teacher import _valid_mean

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 100, (64,), generator=g)
    right = torch.arange(100) < lengths[:, None]
    value = torch.randn(64, 100, 48, generator=g)
    left = torch.stack([row.roll(100 - int(n), dims=0) for row, n in zip(value, lengths)])  # each row's tokens at the end
    cpu = _valid_mean(value, right)
    assert torch.equal(_valid_mean(value.cuda(), right).cpu(), cpu)
    assert torch.equal(_valid_mean(value[:3].cuda(), right[:3]).cpu(), cpu[:3])
    assert torch.equal(_valid_mean(left.cuda(), right.flip(1)).cpu(), cpu)
    for dtype in (torch.bfloat16, torch.float16):
        assert torch.equal(_valid_mean(value.to(dtype).cuda(), right).cpu(), _valid_mean(value.to(dtype), right))
    weights, grads = torch.randn(64, 48, generator=g), []
    for device in ("cpu", "cuda"):
        leaf = value.to(device).requires_grad_()
        (_valid_mean(leaf, right) * weights.to(device)).sum().backward()
        grads.append(leaf.grad.cpu())
    assert torch.equal(grads[0], grads[1])
