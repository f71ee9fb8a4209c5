"""Feature distillation with real architectures (attention blocks, sequence-first encoders, BatchNorm students,
named-output teachers, token taggers): extract a tiny store, then train or set up a student from it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import architectures
import kdcache
from conftest import FIXTURES
from kdcache import store as layout
from kdcache.errors import ModelError, PipelineError, ShapeMismatchError, TargetError
from kdcache.pipeline import from_dict
from kdcache.train import setup


def pipeline(teacher: str = "blocks_teacher", student: str = "blocks_student", data: str = "images", *, layers: tuple[str, ...] = (),
             select: dict[str, str] | None = None, features: dict | None = None, loss: dict | None = None, **train) -> kdcache.Pipeline:
    raw = {"teacher": {"factory": f"architectures.py:{teacher}"}, "data": {"factory": f"architectures.py:{data}"},
           "targets": {"layers": list(layers), "dtype": "float32", "select": select or {}},
           "extract": {"batch_size": 8, "device": "cpu", "rows_per_shard": 8},
           "student": {"factory": f"architectures.py:{student}"},
           "train": {"epochs": 1, "batch_size": 8, "device": "cpu", "features": features or {}, "loss": loss or {}, **train}}
    return from_dict(raw, root=FIXTURES)


def extracted(p: kdcache.Pipeline, tmp_path: Path) -> layout.Store:
    kdcache.extract(p, str(tmp_path / "teacher.zarr"))
    return layout.open_store(str(tmp_path / "teacher.zarr"))


def batch_of(store: layout.Store, paths: list[str], rows: int = 8) -> dict:
    data = architectures.images()
    return {"inputs": torch.stack([data[i][0] for i in range(rows)]), "label": data.y[:rows].clone(),
            "targets": {path: torch.from_numpy(store.read(path, 0, rows)) for path in paths}}


def test_an_output_without_a_known_key_lists_its_keys(tmp_path):
    p = pipeline(teacher="named_outputs_teacher")
    with pytest.raises(TargetError, match=r"output of type dict.*keys: 'out', 'aux'.*\[targets.select\] 'logits'"):
        kdcache.extract(p, str(tmp_path / "teacher.zarr"))
    assert extracted(pipeline(teacher="named_outputs_teacher", select={"logits": "out"}), tmp_path).targets


def test_a_feature_can_select_the_student_module_s_element_as_the_teacher_s_was(tmp_path):
    """The teacher stores its attention weights (element 1 of nn.MultiheadAttention's output); the student's attention
    output (element 0) has the same shape here, so without a student-side select the two were compared silently."""
    p = pipeline(layers=("blocks.1.attn",), select={"blocks.1.attn": "1"}, loss={"kl": 0},
                 features={"blocks.1.attn": {"student": "blocks.0.attn", "select": "1"}})
    store = extracted(p, tmp_path)
    torch.manual_seed(0)
    run = setup(p, store, architectures.images(), torch.device("cpu"))
    assert len(run.heads) == 0  # (16, 16) weights on both sides
    batch = batch_of(store, run.paths)
    parts = run.losses(batch)
    with torch.no_grad():
        h = run.student.blocks[0]["ln"](run.student.patch(batch["inputs"]).flatten(2).transpose(1, 2))
        weights = run.student.blocks[0]["attn"](h, h, h)[1]
    want = torch.nn.functional.mse_loss(weights, batch["targets"][PATH])
    torch.testing.assert_close(parts["feat:blocks.1.attn"].detach(), want)


def test_a_student_select_that_does_not_exist_is_named(tmp_path):
    p = pipeline(layers=("blocks.1.attn",), loss={"kl": 0}, features={"blocks.1.attn": {"student": "blocks.0.attn", "select": "2"}})
    store = extracted(p, tmp_path)
    with pytest.raises(TargetError, match=r"train.features 'blocks.1.attn'.*student module 'blocks.0.attn'.*no element '2'"):
        setup(p, store, architectures.images(), torch.device("cpu"))


def test_a_sequence_first_student_module_is_named_not_read_as_two_tokens(tmp_path):
    """A CLIP-style student runs its blocks on (T, B, D): its per-sample shape is not (B, D) of a two-sample probe."""
    p = pipeline(student="sequence_first_student", layers=("blocks.1.attn",), loss={"kl": 0},
                 features={"blocks.1.attn": {"student": "resblocks.0"}})
    store = extracted(p, tmp_path)
    with pytest.raises(TargetError, match=r"student module 'resblocks.0'.*shape \[16, 2, 16\] for a batch of 2 samples.*first axis"):
        setup(p, store, architectures.images(), torch.device("cpu"))


@pytest.mark.parametrize("batch_size, seen", [(16, "1 sample"), (8, "8 samples")], ids=["time-as-long-as-the-batch", "another-batch"])
def test_a_sequence_first_student_output_is_refused_before_a_step_naming_what_to_change(tmp_path, batch_size, seen):
    """A token tagger student returning its logits (T, B, C), T = 16 tokens, against the teacher's per-token (B, T, C):
    with batches of 16 (train.drop_last: no short batch) the shapes were equal and every sample's targets were compared
    with other samples' outputs, silently; with batches of 8 the first step failed asking for "the student's output
    layer" to produce 5 classes, which it does. setup's probes of a batch (train.batch_size samples) and of one sample
    refuse it before a step, naming the model to change (student.select cannot move the batch axis): a time axis as long
    as the batch is seen in the sample alone."""
    p = pipeline(teacher="tagger_teacher", student="sequence_first_tagger", loss={"kl": 1.0}, batch_size=batch_size, drop_last=True)
    store = extracted(p, tmp_path)
    with pytest.raises(TargetError, match=rf"^the student's output has shape \[16, {seen[0]}, 5\] for a batch of {seen}, but its first axis "
                                          r"must be the samples .* make the model student.factory builds return its output batch first "
                                          r".*student.select's steps .* cannot move it$"):
        kdcache.train(p, store.location, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    selected = pipeline(teacher="tagger_teacher", student="sequence_first_tagger", loss={"kl": 1.0}, batch_size=batch_size)
    raw = selected.to_dict()
    raw["student"]["select"] = "-1"  # on the batch axis: (T, C) for any batch, its first axis the tokens
    with pytest.raises(TargetError, match=rf"^the student's output \(student.select = '-1'\) has shape \[16, 5\] for a batch of {seen}"):
        kdcache.train(from_dict(raw, root=FIXTURES), store.location, tmp_path / "run")


@pytest.mark.parametrize("select", ["1.0", "1.0.-1"], ids=["h_n", "a-step-on-its-batch-axis"])
def test_a_student_module_output_whose_first_axis_is_not_the_samples_is_named_even_as_long_as_the_probe(tmp_path, select):
    """A 2-layer LSTM's h_n is (2, B, H): for setup's probe of two samples its first axis has the probe's length, so it
    passed, and ``"1.0.-1"`` (meant as the last layer, but a step works on axis 1, here the batch) gave (2, H) for every
    batch: a shape error at the first batch of 8, or with train.batch_size = 2 two layers' states of one sample distilled
    as two samples' features. A probe of one sample names it, as extract's does for the teacher."""
    p = pipeline(teacher="vit_teacher", student="lstm_student", layers=("blocks.1.attn",), select={"blocks.1.attn": "0.0"},
                 loss={"kl": 0}, features={"blocks.1.attn": {"student": "lstm", "select": select}})
    store = extracted(p, tmp_path)
    shape = r"\[2, 1, 16\]" if select == "1.0" else r"\[2, 16\]"
    with pytest.raises(TargetError, match=rf"train.features 'blocks.1.attn': student module 'lstm' gives shape {shape} for one sample.*"
                                          r"first axis must be the samples"):
        setup(p, store, architectures.images(), torch.device("cpu"))
    fine = pipeline(teacher="vit_teacher", student="lstm_student", layers=("blocks.1.attn",), select={"blocks.1.attn": "0.0"},
                    loss={"kl": 0}, features={"blocks.1.attn": {"student": "lstm", "select": "0.-1"}})  # the last row's output
    assert setup(fine, store, architectures.images(), torch.device("cpu")).heads


def test_a_batchnorm_student_trains_with_drop_last(tmp_path):
    """17 samples in batches of 8: the last batch holds one sample, which BatchNorm1d cannot normalise in training."""
    p = pipeline(student="batchnorm_student", data="images_17", loss={"kl": 1.0})
    store = extracted(p, tmp_path)
    with pytest.raises(ModelError, match=r"a batch of one sample.*set train.drop_last = true"):
        kdcache.train(p, store.location, tmp_path / "run")
    result = kdcache.train(pipeline(student="batchnorm_student", data="images_17", loss={"kl": 1.0}, drop_last=True), store.location,
                           tmp_path / "run2")
    assert result["step"] == 2  # 16 of the 17 rows, in two full batches


@pytest.mark.parametrize("budget", [2048, 0], ids=["memory", "stream"])
def test_drop_last_that_leaves_no_batch_is_refused_before_training(tmp_path, budget):
    p = pipeline(student="batchnorm_student", data="images_17", loss={"kl": 1.0})
    store = extracted(p, tmp_path)
    for steps in (0, 5):  # epochs (nothing to train), steps (a loop that would never reach them)
        with pytest.raises(PipelineError, match=r"train.drop_last = true leaves no batch in epoch 0: 17 rows.*batch_size = 32") as e:
            kdcache.train(pipeline(student="batchnorm_student", data="images_17", loss={"kl": 1.0}, drop_last=True, batch_size=32,
                                   steps=steps, memory_budget_mb=budget), store.location, tmp_path / "run")
        # in RAM a buffer is one batch: more shards a buffer would change nothing
        assert ("train.shuffle_buffer_shards" in str(e.value)) == (budget == 0), str(e.value)
        assert not (tmp_path / "run").exists()


def test_ce_with_per_token_logits_says_labels_are_per_sample(tmp_path):
    p = pipeline(teacher="tagger_teacher", student="tagger_student", loss={"kl": 1.0, "ce": 1.0})
    store = extracted(p, tmp_path)
    with pytest.raises(ShapeMismatchError, match=r"train.loss.ce.*one label per sample.*\(8, 16, 5\).*set train.loss.ce = 0"):
        kdcache.train(p, store.location, tmp_path / "run")
    result = kdcache.train(pipeline(teacher="tagger_teacher", student="tagger_student", loss={"kl": 1.0}), store.location, tmp_path / "run2")
    assert result["loss_kl"] > 0


def test_eval_accuracy_of_a_per_token_student_is_refused_before_training(tmp_path):
    """A token tagger's (B, T, C) output cannot be scored against one label per sample: refused before an epoch is spent
    (it was a RuntimeError traceback at the end of the first epoch, or a silent broadcast where T equalled the batch)."""
    p = pipeline(teacher="tagger_teacher", student="tagger_student", loss={"kl": 1.0}, eval_split="test")
    store = extracted(p, tmp_path)
    with pytest.raises(PipelineError, match=r"train.eval_split = 'test': eval_accuracy .* shape \[1, 16, 5\] for one sample"):
        kdcache.train(p, store.location, tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# ------------------------------------------------------------------ ViT tokens: class token, patch tokens, CNN <-> ViT


PATH = layout.layer_path("blocks.1.attn")


def attention_output(model: torch.nn.Module, module: str, x: torch.Tensor) -> torch.Tensor:
    """Element 0 of ``module``'s output in a forward pass of ``model`` on ``x``, captured by a hook of our own."""
    seen = []
    handle = dict(model.named_modules())[module].register_forward_hook(lambda _m, _i, out: seen.append(out[0].detach().clone()))
    with torch.no_grad():
        model(x)
    handle.remove()
    return seen[0]


@pytest.mark.parametrize("select, part", [("0.0", lambda a: a[:, 0]), ("0.1:", lambda a: a[:, 1:]), ("0.-1", lambda a: a[:, -1]),
                                          ("0.mean", lambda a: a.mean(1)), ("0.1:5.mean", lambda a: a[:, 1:5].mean(1))],
                         ids=["class-token", "patch-tokens", "last-token", "mean", "slice-then-mean"])
def test_a_select_step_on_a_tensor_stores_that_part_of_every_sample(tmp_path, select, part):
    """``[targets.select]`` steps past the tuple index work on each sample's first axis: ViT's class token ``0``, its patch
    tokens ``1:``, mean-pooled tokens ``mean``; the teacher's (B, 17, 32) attention output stored as selected, row for row."""
    p = pipeline(teacher="vit_teacher", layers=("blocks.1.attn",), select={"blocks.1.attn": select})
    store = extracted(p, tmp_path)
    expected = part(attention_output(architectures.vit_teacher(), "blocks.1.attn", architectures.images().x))
    assert store.targets["blocks.1.attn"].shape == tuple(expected.shape[1:])
    assert store.targets["blocks.1.attn"].select == select
    torch.testing.assert_close(torch.from_numpy(store.read(PATH, 0, 20)), expected)


@pytest.mark.parametrize("select, match", [
    ("0.17", r"index 17 is outside the 17 entries of the sample's first axis \(per-sample shape \[17, 32\]\).*from -17 to 16"),
    ("0.-18", r"index -18 is outside the 17 entries"),
    ("0.20:", r"slice '20:' of the sample's first axis \(17 entries.*is empty"),
    ("0.0.0.0", r"the output is one value per sample \(a tensor of shape \(8,\)\), which step '0' cannot index"),
    ("0.cls", r"output of type Tensor \(per-sample shape \[17, 32\]\) has no element 'cls'.*an index.*a slice.*\"mean\""),
    ("0.1:2:3", r"output of type Tensor .* has no element '1:2:3'"),
    ("0.0.transpose", r"'transpose' swaps the sample's first two axes, but the per-sample shape is \[32\]"),
    ("0.--1", r"output of type Tensor .* has no element '--1'"),  # were ValueError tracebacks from int(): isdigit() took them
    ("0.\u00b2", r"output of type Tensor .* has no element '\u00b2'"),
    ("--1", r"output of type tuple has no element '--1'"),
    ("0.-:", r"output of type Tensor .* has no element '-:'"),  # a bound of "-" alone was int('-'): a ValueError traceback
    ("0.:-", r"output of type Tensor .* has no element ':-'"),
    ("0.mena", r"output of type Tensor .* has no element 'mena' \(did you mean 'mean'\?\); fix"),  # a typo: no hint was given
])
def test_a_select_step_a_tensor_cannot_take_is_named_before_a_store_exists(tmp_path, select, match):
    p = pipeline(teacher="vit_teacher", layers=("blocks.1.attn",), select={"blocks.1.attn": select})
    with pytest.raises(TargetError, match=rf"target 'blocks.1.attn': (?=.*\[targets.select\] 'blocks.1.attn'){match}"):
        kdcache.extract(p, str(tmp_path / "teacher.zarr"))
    assert not (tmp_path / "teacher.zarr").exists()


def test_teacher_check_with_another_select_names_it(tmp_path):
    """``verify --teacher-check`` with a pipeline selecting another part of the output: rows of another shape were a numpy
    broadcast ValueError or IndexError traceback, now refused naming both selects; rows of the same shape holding other
    values fail as before, the differing selects named as the likely cause (a store's select is provenance another writer
    may spell its own way, so it is not refused on its own). The store's own select verifies."""
    from kdcache.errors import StoreError
    from kdcache.verify import verify

    store = extracted(pipeline(teacher="vit_teacher", layers=("blocks.1.attn",), select={"blocks.1.attn": "0.1:"}), tmp_path)
    for select, shape in (("0", [17, 32]), ("0.0", [32])):
        for rows in (1, 4):
            with pytest.raises(StoreError, match=rf"target 'blocks.1.attn' as select '{select}', per-sample shape \{shape}; the store "
                                                 r"holds select '0.1:', shape \[16, 32\]; pass the pipeline the store was extracted with"):
                verify(store.location, teacher_check=rows,
                       pipeline=pipeline(teacher="vit_teacher", layers=("blocks.1.attn",), select={"blocks.1.attn": select}))
    shifted = verify(store.location, teacher_check=4,
                     pipeline=pipeline(teacher="vit_teacher", layers=("blocks.1.attn",), select={"blocks.1.attn": "0.0:16"}))
    teacher = next(c for c in shifted["checks"] if c["name"] == "teacher")
    assert not teacher["ok"] and re.search(r"target 'blocks.1.attn': \d+ values beyond tolerance.*\(the pipeline selects '0.0:16', "
                                           r"the store recorded '0.1:'\)$", teacher["problems"][0])
    same = pipeline(teacher="vit_teacher", layers=("blocks.1.attn",), select={"blocks.1.attn": "0.1:"})
    assert verify(store.location, teacher_check=4, pipeline=same)["ok"]


def feature_loss(p: kdcache.Pipeline, store: layout.Store, path: str) -> tuple:
    """The run's one projection head, its feature loss for ``path`` on the first batch, the batch's stored target, the run
    and the batch."""
    torch.manual_seed(0)
    run = setup(p, store, architectures.images(), torch.device("cpu"))
    batch = batch_of(store, run.paths)
    return run.heads[next(iter(run.heads))], run.losses(batch)[f"feat:{layout.layer_name(path)}"], batch["targets"][path], run, batch


@pytest.mark.parametrize("select, description, reference", [
    ("0.1:", "1x1 conv 8->32 + 4x4 grid as 16 tokens",
     lambda head, fmap: torch.stack([head.map.conv(fmap)[:, :, t // 4, t % 4] for t in range(16)], dim=1)),
    ("0.0", "global avg pool 4x4 + linear 8->32", lambda head, fmap: head.linear(fmap.mean((2, 3)))),
], ids=["patch-tokens", "class-token"])
def test_a_cnn_student_learns_a_vit_teacher_s_tokens(tmp_path, select, description, reference):
    """The teacher's 16 patch tokens (class token dropped with ``1:``) are a 4x4 grid: the CNN student's (8, 4, 4) map is
    projected to 32 channels and read out row-major, token t = cell (t // 4, t % 4), as the teacher's patch embedding made
    them. Its class token (``0``) is a (32,) vector, learned through the pooling head."""
    p = pipeline(teacher="vit_teacher", student="cnn_student", layers=("blocks.1.attn",), select={"blocks.1.attn": select},
                 loss={"kl": 0}, features={"blocks.1.attn": {"student": "features"}})
    store = extracted(p, tmp_path)
    head, loss, target, run, batch = feature_loss(p, store, PATH)
    assert head.description == description
    with torch.no_grad():
        want = torch.nn.functional.mse_loss(reference(head, run.student.features(batch["inputs"])), target)
    torch.testing.assert_close(loss.detach(), want)
    result = kdcache.train(p, store.location, tmp_path / "run")
    assert result["loss_feat:blocks.1.attn"] > 0
    saved = torch.load(tmp_path / "run" / "heads.pt", weights_only=True)
    assert {key.split(".", 1)[1] for key in saved} == set(head.state_dict())


def test_a_vit_student_s_patch_tokens_learn_a_cnn_teacher_s_map(tmp_path):
    """The other way: the student's 17 tokens, class token dropped with its own ``select``, laid on a 4x4 grid and
    projected to the teacher's 24 channels. Without the select its 17 tokens fit no grid: named, with the fix."""
    features = {"features": {"student": "blocks.0.attn", "select": "0.1:"}}
    p = pipeline(teacher="cnn_teacher", student="vit_student", layers=("features",), loss={"kl": 0}, features=features)
    store = extracted(p, tmp_path)
    head, loss, target, run, batch = feature_loss(p, store, layout.layer_path("features"))
    assert head.description == "16 tokens as a 4x4 grid + 1x1 conv 16->24"
    tokens = attention_output(run.student, "blocks.0.attn", batch["inputs"])[:, 1:]  # (8, 16, 16)
    with torch.no_grad():
        grid = torch.stack([torch.stack([tokens[:, r * 4 + c] for c in range(4)], dim=-1) for r in range(4)], dim=-2)  # (8, 16, 4, 4)
        want = torch.nn.functional.mse_loss(head.map.conv(grid), target)
    torch.testing.assert_close(loss.detach(), want)
    unselected = pipeline(teacher="cnn_teacher", student="vit_student", layers=("features",), loss={"kl": 0},
                          features={"features": {"student": "blocks.0.attn"}})
    with pytest.raises(ShapeMismatchError, match=r"target 'features'.*student shape \(17, 16\).*student's 17 tokens are neither "
                                                 r"the map's 4x4 positions nor a square patch grid.*select step \"1:\""):
        setup(unselected, store, architectures.images(), torch.device("cpu"))


def test_conv1d_maps_are_distilled_per_position_once_transposed(tmp_path):
    """A Conv1d's (channels, length) output is read as (tokens, dim): teacher (24, 64) and student (8, 64) have "24 and 8
    tokens", which no head bridges. ``transpose`` on both sides makes them 64 positions of 24 and 8 channels: a linear
    head per position, i.e. a 1x1 convolution over the channels."""
    features = {"conv": {"student": "conv"}}
    p = pipeline(teacher="conv1d_teacher", student="conv1d_student", layers=("conv",), loss={"kl": 0}, features=features)
    store = extracted(p, tmp_path / "plain")
    with pytest.raises(ShapeMismatchError, match=r"student token sequence \(8, 64\) has 8 tokens but teacher \(24, 64\) has 24"):
        setup(p, store, architectures.images(), torch.device("cpu"))
    features["conv"]["select"] = "transpose"
    p = pipeline(teacher="conv1d_teacher", student="conv1d_student", layers=("conv",), select={"conv": "transpose"}, loss={"kl": 0},
                 features=features)
    store = extracted(p, tmp_path)
    x = architectures.images().x
    with torch.no_grad():
        want = architectures.conv1d_teacher().conv(x.flatten(2)).transpose(1, 2)  # (20, 64, 24)
    torch.testing.assert_close(torch.from_numpy(store.read(layout.layer_path("conv"), 0, 20)), want)
    head, loss, target, run, batch = feature_loss(p, store, layout.layer_path("conv"))
    assert head.description == "linear 8->24 per token (T=64)"
    with torch.no_grad():
        ref = torch.nn.functional.mse_loss(head.linear(run.student.conv(batch["inputs"].flatten(2)).transpose(1, 2)), target)
    torch.testing.assert_close(loss.detach(), ref)


def test_a_language_model_s_last_position_is_distilled_with_student_select(tmp_path):
    """A causal LM's next-token distribution: the teacher's per-token logits (B, 16, 5) stored at the last position with
    ``targets.select.logits = "-1"``; the student's own (B, 16, 5) output needs the same part, ``student.select = "-1"``
    (without it KL compares (8, 16, 5) with (8, 5): an error before a step), for the loss and for eval_accuracy."""
    p = pipeline(teacher="tagger_teacher", student="tagger_student", select={"logits": "-1"}, loss={"kl": 1.0})
    store = extracted(p, tmp_path)
    x = architectures.images().x
    with torch.no_grad():
        teacher = architectures.tagger_teacher()(x)[:, -1]
    torch.testing.assert_close(torch.from_numpy(store.read(layout.LOGITS, 0, 20)), teacher)
    with pytest.raises(ShapeMismatchError, match=r"student shape \(8, 16, 5\) does not match teacher shape \(8, 5\): the student's output "
                                                 r"has more axes .* \[5\]\); student.select picks the part .* e.g. \"-1\""):
        kdcache.train(p, store.location, tmp_path / "unselected")
    raw = p.to_dict()
    raw["student"]["select"] = "-1"
    raw["train"]["eval_split"] = "test"
    selected = from_dict(raw, root=FIXTURES)
    torch.manual_seed(0)
    run = setup(selected, store, architectures.images(), torch.device("cpu"))
    batch = batch_of(store, run.paths)
    with torch.no_grad():
        want = kdcache.losses.kl_divergence(run.student(batch["inputs"])[:, -1], batch["targets"][layout.LOGITS], 4.0)
    torch.testing.assert_close(run.losses(batch)["kl"].detach(), want)
    result = kdcache.train(selected, store.location, tmp_path / "run")
    assert result["loss_kl"] > 0 and 0 <= result["eval_accuracy"] <= 1
    raw["student"]["select"] = "-17"
    with pytest.raises(TargetError, match=r"the student output: index -17 is outside the 16 entries.*fix student.select"):
        kdcache.train(from_dict(raw, root=FIXTURES), store.location, tmp_path / "bad")


def test_an_eval_cache_of_another_part_of_the_teacher_s_output_is_refused_before_training(tmp_path):
    """eval_agreement compares the student's top class with the eval store's teacher's: an eval store extracted with another
    targets.select (the first position of a causal LM, not the last the student learns) was accepted and reported the
    agreement with that position's predictions; one of per-token logits (no select) ended the first epoch in a RuntimeError
    traceback, the epoch lost. Both are refused before the first step, as is one whose classes the student does not give
    (a run whose store holds no logits)."""
    p = pipeline(teacher="tagger_teacher", student="tagger_student", select={"logits": "-1"}, loss={"kl": 1.0})
    store = extracted(p, tmp_path)
    raw = p.to_dict()
    raw["student"]["select"] = "-1"

    def eval_store(name: str, select: dict[str, str], **targets) -> str:
        evaluated = p.to_dict()
        evaluated["data"]["split"] = "test"
        evaluated["targets"] = {**evaluated["targets"], "select": select, **targets}
        kdcache.extract(from_dict(evaluated, root=FIXTURES), str(tmp_path / name))
        return str(tmp_path / name)

    first, every = eval_store("first.zarr", {"logits": "0"}), eval_store("every.zarr", {})
    for evaluated, seen in ((first, r"select '0', per-sample shape \[5\]"), (every, r"select 'tensor', per-sample shape \[16, 5\]")):
        raw["train"]["eval_cache"] = evaluated
        with pytest.raises(PipelineError, match=rf"train.eval_cache '.*' stores the teacher's logits as {seen}, but the store trained "
                                                r"from as select '-1', shape \[5\]: eval_agreement would compare the student with "
                                                r"another part of the teacher's output; extract the eval split with the training "
                                                r"store's targets.select \(logits = '-1'\)"):
            kdcache.train(from_dict(raw, root=FIXTURES), store.location, tmp_path / "run")
        assert not (tmp_path / "run" / "checkpoint.pt").exists()
    raw["train"]["eval_cache"] = eval_store("last.zarr", {"logits": "-1"})
    result = kdcache.train(from_dict(raw, root=FIXTURES), store.location, tmp_path / "run")
    assert 0 <= result["eval_agreement"] <= 1
    # a store of features alone, nothing to compare the eval store's logits with: the student's output is
    features = pipeline(teacher="tagger_teacher", student="tagger_student", layers=("patch",), loss={"kl": 0.0},
                        features={"patch": {"student": "patch"}}).to_dict()
    features["targets"]["logits"] = False
    features["student"]["select"] = "-1"
    kdcache.extract(from_dict(features, root=FIXTURES), str(tmp_path / "features.zarr"))
    features["train"]["eval_cache"] = every
    with pytest.raises(PipelineError, match=r"eval_agreement compares the student's top class with the teacher's, but the eval store's "
                                            r"logits have per-sample shape \[16, 5\] and the student's output \[5\]"):
        kdcache.train(from_dict(features, root=FIXTURES), str(tmp_path / "features.zarr"), tmp_path / "features")


def test_slice_bounds_past_the_axis_are_clamped_as_python_slices_are():
    """Python's slice semantics, without torch's "Truncating ... saved old models" UserWarning for bounds past 2**63."""
    import warnings

    from kdcache.teacher import select

    x = torch.randn(2, 5, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step, want in (("1:99999999999999999999", x[:, 1:]), ("-99999999999999999999:2", x[:, :2]), ("-2:", x[:, -2:])):
            torch.testing.assert_close(select(x, step, "t")[0], want)
    with pytest.raises(TargetError, match=r"index 0 is outside the 0 entries .* \(it has no entry to index\)"):
        select(torch.randn(2, 0, 3), "0", "t")
