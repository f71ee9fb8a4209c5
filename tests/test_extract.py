"""Tests for kdcache.extract: real stores on disk, checked against the teacher recomputed here.

The zoo's datasets carry each sample's index in its input and its teachers turn it into logits
``(i, i + 0.5, -i)``, so a row that belongs to another sample cannot pass.
"""

from __future__ import annotations

import importlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import extract_zoo as zoo
import kdcache
from kdcache import data
from kdcache.errors import DataError, PipelineError, StoreError, StoreMismatchError, TargetError
from kdcache.store import open_store
from conftest import FIXTURES, NUMBERED
from kdcache.pipeline import from_dict
from reference import crash_at, file_bytes, make_pipeline, mtimes, read_store, without_times, write_toml

TOL = {"float16": {"rtol": 2e-3, "atol": 1e-3}, "float32": {"rtol": 1e-5, "atol": 1e-6}}
NP = {"float16": np.float16, "float32": np.float32}


def extract(tmp_path: Path, *overrides: str, name: str = "store.zarr") -> tuple[dict, dict[str, np.ndarray]]:
    """Extract ``make_pipeline(*overrides)`` into ``tmp_path/name``; return the manifest and arrays read back."""
    out = tmp_path / name
    info = kdcache.extract(make_pipeline(*overrides), str(out))
    assert info["complete"] and info["samples_done"] == info["num_samples"]
    return read_store(out)


def assert_close(stored: np.ndarray, expected: torch.Tensor, dtype: str) -> None:
    assert stored.dtype == NP[dtype]
    assert stored.shape == tuple(expected.shape)
    np.testing.assert_allclose(stored.astype(np.float32), expected.float().numpy(), **TOL[dtype])


# ----------------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip_logits_conv_map_and_vector(tmp_path, dtype):
    manifest, arrays = extract(tmp_path, f"targets.dtype={dtype}")

    model, x = zoo.first_pixel(), zoo.images().x
    with torch.no_grad():
        conv = model.conv(x)  # (50, 3, 4, 4)
        fc = model.fc(torch.relu(conv).flatten(1))  # (50, 6)
        logits = model(x)  # (50, 3)
    assert_close(arrays["targets/logits"], logits, dtype)
    assert_close(arrays["targets/layers/conv"], conv, dtype)
    assert_close(arrays["targets/layers/fc"], fc, dtype)
    np.testing.assert_array_equal(arrays["targets/logits"], zoo.index_logits(x).numpy().astype(NP[dtype]))  # exact

    assert manifest["targets"] == {
        "logits": {"name": "logits", "path": "targets/logits", "shape": [3], "dtype": dtype, "source": "", "select": "tensor"},
        "conv": {"name": "conv", "path": "targets/layers/conv", "shape": [3, 4, 4], "dtype": dtype, "source": "conv", "select": "tensor"},
        "fc": {"name": "fc", "path": "targets/layers/fc", "shape": [6], "dtype": dtype, "source": "fc", "select": "tensor"},
    }
    assert manifest["num_samples"] == 50 and manifest["has_labels"] is True
    assert manifest["teacher"]["factory"] == "extract_zoo.py:first_pixel"
    assert arrays["progress/done"].tolist() == [True] * 4


def test_teacher_with_batchnorm_round_trips(tmp_path):
    """BatchNorm's 0-d ``num_batches_tracked`` must not stop the weights hash."""
    manifest, arrays = extract(tmp_path, "teacher.factory=extract_zoo.py:with_batchnorm", "targets.layers=['bn']", "targets.dtype=float32")
    model, x = zoo.with_batchnorm().eval(), zoo.images().x  # running statistics, as extract uses
    with torch.no_grad():
        bn = model.bn(model.conv(x))
    assert_close(arrays["targets/layers/bn"], bn, "float32")
    assert len(manifest["teacher"]["weights_sha256"]) == 64


@pytest.mark.parametrize("factory, said", [("batch_statistics", True), ("with_batchnorm", False)])
def test_a_teacher_that_mixes_the_samples_of_a_batch_is_named(tmp_path, capfd, factory, said):
    """A teacher whose outputs depend on the other samples of its batch (BatchNorm on batch statistics) stored rows that
    depend on extract.batch_size and on where a resumed run began, exit 0, and verify --teacher-check then failed
    without a reason. Sample 0 alone against its probe batch names it (on stderr), before any row is written; a
    BatchNorm with running statistics in eval mode gives each sample its own output and says nothing."""
    extract(tmp_path, f"teacher.factory=extract_zoo.py:{factory}", "targets.layers=['bn']", "targets.dtype=float32")
    err = capfd.readouterr().err
    note = "note: the teacher's output for sample 0 differs between its probe batch and a batch of itself alone ('bn' by "
    assert (note in err and "track_running_stats=False" in err and "extract.batch_size" in err) == said, err
    assert "'logits'" not in err  # its logits are the index's, whatever the batch


@pytest.mark.parametrize("factory, check", [("out_of_device_memory_alone", "the check of sample 0 alone against its row of the probe batch"),
                                            ("out_of_device_memory_again", "the check of the probe batch with its samples moved one place")],
                         ids=["alone", "reordered"])
def test_a_setup_check_skipped_for_device_memory_says_so(capfd, factory, check):
    """A setup check that runs the teacher again (sample 0 alone; the probe batch reordered) and ran out of device memory
    was skipped in silence (its DeviceMemoryError is a ModelError, which it lets be): a teacher that mixes or reorders
    its batch then went unnoticed. It is still not refused (the probe batch fitted), but said in one warning line."""
    report = kdcache.dry_run(make_pipeline(f"teacher.factory=bad_input.py:{factory}", "data.factory=tiny.py:dataset", "targets.layers=[]"))
    assert report["probe_batch"] == 8
    lines = [line for line in capfd.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"warning: {check} (a teacher that mixes or reorders the samples of a batch) was skipped: the teacher "
                               "ran out of device memory (OutOfMemoryError: CUDA out of memory. Tried to allocate 512.00 MiB (at bad_input.py:")
    assert "kdcache verify --teacher-check N" in lines[0]


def test_a_setup_check_skipped_for_device_memory_concludes_nothing(capfd):
    """Sample 0 alone gave another sample's row, and that sample alone ran out of device memory: the check said it was
    skipped and, in the same breath, named the teacher as one that mixes its batch (a note on 'logits'), a conclusion of
    the check that did not run (here wrong too: the teacher sorts its batch). Now it only says it was skipped."""
    report = kdcache.dry_run(from_dict({**NUMBERED, "teacher": {"factory": "numbered.py:sorting_echo_out_of_memory_again"}}, root=FIXTURES))
    assert report["probe_batch"] == 16
    err = capfd.readouterr().err.splitlines()
    assert [line for line in err if line.startswith("note:")] == [], err
    skipped = [line for line in err if line.startswith("warning:")]
    assert len(skipped) == 1 and skipped[0].startswith("warning: the check of sample 0 alone against its row of the probe batch "
                                                       "(a teacher that mixes or reorders the samples of a batch) was skipped"), err


def test_a_teacher_that_mixes_its_batch_is_not_taken_for_one_that_moves_its_rows(tmp_path, capfd):
    """A teacher on batch statistics whose layer is a confident softmax: sample 0 alone landed on another sample's class,
    within the tolerance of that sample's row, and extract refused it as returning its rows in another order, where a
    teacher that mixes its batch is named in a note (README). Its rows follow their samples when the batch is reordered."""
    extract(tmp_path, "teacher.factory=extract_zoo.py:confident_batch_statistics", "targets.layers=['probs']", "targets.dtype=float32")
    assert "note: the teacher's output for sample 0 differs between its probe batch and a batch of itself alone ('probs' by " \
        in capfd.readouterr().err


def test_store_is_readable_through_open_store(tmp_path):
    out = tmp_path / "store.zarr"
    kdcache.extract(make_pipeline(), str(out))
    store = open_store(out)
    _, arrays = read_store(out)
    assert store.complete and store.num_shards == 4 and store.rows_per_shard == 16
    assert set(store.paths()) == {p for p in arrays if not p.startswith("progress/")}
    blocks = [store.shard_rows(s) for s in range(store.num_shards)]
    assert blocks[0][0] == 0 and blocks[-1][1] == 50
    for path in store.paths():
        np.testing.assert_array_equal(np.concatenate([store.read(path, lo, hi) for lo, hi in blocks]), arrays[path])


# ----------------------------------------------------------------------------------- alignment


@pytest.mark.parametrize(
    "n, batch_size, rows_per_shard, num_workers",
    [
        (50, 8, 16, 0),  # last shard partial (2 rows)
        (50, 5, 16, 0),  # batch size does not divide the shard
        (50, 64, 16, 0),  # batch larger than a shard
        (50, 7, 0, 0),  # geometry chosen automatically (one shard)
        (37, 3, 12, 2),  # two DataLoader workers, shard not a power of two, last shard 1 row
        (50, 6, 16, 2),
    ],
)
def test_rows_belong_to_their_samples(tmp_path, zoo_env, n, batch_size, rows_per_shard, num_workers):
    zoo_env(N=n)
    manifest, arrays = extract(
        tmp_path, f"extract.batch_size={batch_size}", f"extract.rows_per_shard={rows_per_shard}", f"extract.num_workers={num_workers}"
    )
    dataset = zoo.images()
    index = np.arange(n)
    np.testing.assert_array_equal(arrays["samples/index"], index)
    assert arrays["samples/index"].dtype == np.int64 and arrays["samples/fingerprint"].dtype == np.uint64
    np.testing.assert_array_equal(arrays["samples/label"], (3 * index) % 5)
    assert arrays["samples/fingerprint"].tolist() == [data.fingerprint(dataset[i][0]) for i in range(n)]
    assert len(set(arrays["samples/fingerprint"].tolist())) == n
    np.testing.assert_array_equal(arrays["targets/logits"][:, 0], index.astype(np.float16))
    np.testing.assert_array_equal(arrays["targets/logits"][:, 1], (index + 0.5).astype(np.float16))

    model = zoo.first_pixel()
    with torch.no_grad():
        conv = model.conv(dataset.x)
    assert_close(arrays["targets/layers/conv"], conv, "float16")
    geometry = manifest["geometry"]
    assert arrays["progress/done"].all() and len(arrays["progress/done"]) == geometry["num_shards"] == -(-n // geometry["rows_per_shard"])


@pytest.mark.parametrize("layout, num_workers", [("transposed", 0), ("shared", 2), ("fortran", 0), ("embedded", 0), ("embedded", 2)])
def test_inputs_in_another_memory_layout_are_the_same_inputs_at_extract_and_train(tmp_path, zoo_env, layout, num_workers):
    """FORMAT.md §9: a fingerprint is of the input's values, not of its memory: items that are non-contiguous views, views
    of one buffer at a storage offset, column-major arrays or views of a tensor that requires grad (inputs computed outside
    torch.no_grad()) make the store their contiguous copies make, byte for byte, and training pairs every row of either
    store with either dataset. Items requiring grad were a RuntimeError traceback in a DataLoader worker (its
    torch.stack(out=) refuses autograd)."""
    zoo_env(N=20)
    _, plain = extract(tmp_path, "targets.layers=['conv']", name="plain.zarr")
    zoo_env(N=20, LAYOUT=layout)
    _, laid = extract(tmp_path, "data.factory=extract_zoo.py:laid_out", "targets.layers=['conv']", f"extract.num_workers={num_workers}",
                      name="laid.zarr")
    assert laid.keys() == plain.keys()
    for path in plain:
        np.testing.assert_array_equal(laid[path], plain[path], err_msg=path)
    for store in ("plain.zarr", "laid.zarr"):
        for dataset in (zoo.images(), zoo.laid_out()):
            served = kdcache.TransferSet(tmp_path / store, dataset, ["logits"], batch_size=6, seed=0)
            for batch in served:
                assert not batch["inputs"].requires_grad
                np.testing.assert_array_equal(batch["targets"]["targets/logits"][:, 0].numpy(), batch["index"].numpy().astype(np.float16))


def test_hooked_outputs_in_unusual_layouts_are_stored_as_their_values(tmp_path, zoo_env):
    """Layers whose outputs are channels_last, a transposed view, an expanded view (stride 0), float64, or two views of one
    buffer are stored as the values the teacher produced, row r for sample r."""
    zoo_env(N=20)
    layers = ["nhwc", "swapped", "pooled", "wide", "left", "right"]
    _, arrays = extract(tmp_path, "teacher.factory=extract_zoo.py:odd_layouts", f"targets.layers={layers}", "targets.dtype=float32",
                        "extract.batch_size=6")
    model, x = zoo.odd_layouts(), zoo.images().x
    hooked = {}
    for name in layers:
        getattr(model, name).register_forward_hook(lambda _m, _i, out, name=name: hooked.__setitem__(name, out.clone()))
    with torch.no_grad():
        logits = model(x)
    np.testing.assert_array_equal(arrays["targets/logits"], logits.numpy())
    for name in layers:
        assert_close(arrays[f"targets/layers/{name}"], hooked[name], "float32")
    np.testing.assert_array_equal(arrays["targets/layers/left"], arrays["targets/layers/nhwc"][:, :2])
    np.testing.assert_array_equal(arrays["targets/layers/right"], arrays["targets/layers/nhwc"][:, 1:].transpose(0, 1, 3, 2))


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_a_model_that_reuses_its_output_buffer_still_stores_each_batch(tmp_path, zoo_env, dtype):
    """The writer keeps each batch's host arrays until the shard is written: they must not be the model's own
    buffer, or every row of a shard would hold the last batch's values (float32: no dtype conversion copies it)."""
    zoo_env(N=50)
    _, arrays = extract(tmp_path, "teacher.factory=extract_zoo.py:same_buffer", f"targets.dtype={dtype}",
                        "extract.batch_size=4", "extract.rows_per_shard=16")
    index = np.arange(50)
    np.testing.assert_array_equal(arrays["targets/logits"][:, 0], index.astype(NP[dtype]))
    np.testing.assert_array_equal(arrays["targets/logits"][:, 2], (-index).astype(NP[dtype]))


@pytest.mark.parametrize("chunk_mb, batch_size, conv_rows", [(1e-5, 3, 1), (2e-4, 3, 2), (3.7e-4, 5, 4), (7.4e-4, 7, 8)])
def test_store_bytes_do_not_depend_on_how_batches_cut_the_inner_chunks(tmp_path, zoo_env, chunk_mb, batch_size, conv_rows):
    """Shards are written from the batches as they came (no shard buffer): inner chunks inside one batch are
    views, chunks that straddle batches are joined. Every way of cutting gives the bytes of one batch per shard."""
    zoo_env(N=50)
    common = ["targets.layers=['conv']", f"extract.chunk_mb={chunk_mb}", "extract.rows_per_shard=16"]
    manifest, _ = extract(tmp_path, *common, "extract.batch_size=16", name="whole.zarr")
    assert manifest["geometry"]["chunk_rows"]["targets/layers/conv"] == conv_rows  # 96 B rows; the samples/* columns: 1 or 16
    extract(tmp_path, *common, f"extract.batch_size={batch_size}", name="cut.zarr")
    files = {name: {str(f.relative_to(tmp_path / name)): f.read_bytes() for f in (tmp_path / name).rglob("*") if f.is_file() and f.name != "zarr.json"}
             for name in ("whole.zarr", "cut.zarr")}
    assert files["whole.zarr"].keys() == files["cut.zarr"].keys() and len(files["cut.zarr"]) > 10
    assert files["whole.zarr"] == files["cut.zarr"]


def _rewrite(reference: Path, out: Path, order: list[int], batch: int = 4) -> None:
    """Feed ``reference``'s rows, as batches of ``batch`` rows taken in ``order``, to a ShardWriter of a new store."""
    import importlib

    from kdcache import store as layout
    from kdcache.progress import Progress

    kx = importlib.import_module("kdcache.extract")
    ref = open_store(str(reference))
    store = layout.create_or_resume(str(out), lambda _: ref.manifest)
    batches = []
    for shard in range(store.num_shards):
        start, stop = store.shard_rows(shard)
        batches += [np.arange(lo, min(lo + batch, stop)) for lo in range(start, stop, batch)]
    with kx.ShardWriter(store, 2, Progress(0, "", enabled=False), background=False) as writer:
        for i in order:
            rows = batches[i]
            values = {p: ref.array(p)[int(rows[0]) : int(rows[-1]) + 1] for p in ref.paths()}
            host = {p: torch.from_numpy(v) for p, v in values.items() if p.startswith("targets/")}
            host |= {p + "#sum": t.float().sum() for p, t in list(host.items())}
            writer.put({"index": values["samples/index"], "fingerprint": values["samples/fingerprint"],
                        "label": values["samples/label"]}, host, None)


def test_the_writer_places_batches_by_their_rows_whatever_their_order(tmp_path, zoo_env):
    """Batches of a shard are joined in row order, not arrival order; a batch that overlaps another is an error."""
    zoo_env(N=50)
    extract(tmp_path, "targets.layers=['conv']", "extract.batch_size=4", "extract.rows_per_shard=16", name="reference.zarr")
    order = np.random.default_rng(0).permutation(13).tolist()  # 13 batches over 4 shards, interleaved
    _rewrite(tmp_path / "reference.zarr", tmp_path / "shuffled.zarr", order)
    ref, got = open_store(str(tmp_path / "reference.zarr")), open_store(str(tmp_path / "shuffled.zarr"))
    assert got.complete
    for path in ref.paths():
        np.testing.assert_array_equal(got.array(path)[:], ref.array(path)[:], err_msg=path)
    with pytest.raises(RuntimeError, match=r"do not tile its 16 rows"):
        _rewrite(tmp_path / "reference.zarr", tmp_path / "twice.zarr", [0, 1, 1, 3])  # batch 1 twice, batch 2 never


def test_unlabeled_dataset_has_no_label_array(tmp_path):
    manifest, arrays = extract(tmp_path, "data.split=unlabeled")
    assert manifest["has_labels"] is False
    assert "samples/label" not in arrays
    dataset = zoo.images("unlabeled")
    assert arrays["samples/fingerprint"].tolist() == [data.fingerprint(dataset[i]) for i in range(50)]


def test_dict_items_are_keyword_arguments_and_label_is_not_an_input(tmp_path):
    manifest, arrays = extract(tmp_path, "teacher.factory=extract_zoo.py:kwargs_model", "data.factory=extract_zoo.py:tokens",
                               "targets.layers=['embed']", "targets.dtype=float32", "extract.batch_size=6")
    dataset, model = zoo.tokens(), zoo.kwargs_model()
    with torch.no_grad():
        logits = model(tokens=dataset.tokens, scale=dataset.scale)
        embed = model.embed(dataset.tokens)
    assert_close(arrays["targets/logits"], logits, "float32")
    assert_close(arrays["targets/layers/embed"], embed, "float32")
    np.testing.assert_array_equal(arrays["samples/label"], np.arange(50) % 3)
    expected = [data.fingerprint({"tokens": dataset.tokens[i], "scale": dataset.scale[i]}) for i in range(50)]
    assert arrays["samples/fingerprint"].tolist() == expected
    assert manifest["targets"]["embed"]["shape"] == [6, 8]


# ----------------------------------------------------------------------------------- teacher outputs


@pytest.mark.parametrize(
    "factory, select, part, resolved",
    [
        ("tensor_out", None, "logits", "tensor"),
        ("tuple_out", None, "logits", "0"),
        ("dataclass_out", None, "logits", "logits"),
        ("dict_out", None, "logits", "logits"),
        ("model_output_out", None, "logits", "logits"),  # a Hugging Face ModelOutput's None fields are passed over
        ("encoder_out", None, "pooled", "pooler_output"),  # no logits: auto takes pooler_output
        ("encoder_out", "last_hidden_state", "hidden", "last_hidden_state"),
        ("tuple_out", "1", "hidden", "1"),
        ("tuple_out", "-1", "hidden", "-1"),
        ("dict_out", "hidden", "hidden", "hidden"),
        ("dataclass_out", "hidden_states.0", "pooled", "hidden_states.0"),
        ("dataclass_out", "hidden_states.1", "hidden", "hidden_states.1"),
        ("unnamed_out", "feats", "hidden", "feats"),
    ],
)
def test_teacher_output_kinds(tmp_path, factory, select, part, resolved):
    overrides = [f"teacher.factory=extract_zoo.py:{factory}", "targets.layers=[]", "targets.dtype=float32"]
    if select is not None:
        overrides.append(f'targets.select.logits="{select}"')
    manifest, arrays = extract(tmp_path, *overrides)
    model = getattr(zoo, factory)()
    with torch.no_grad():
        expected = model.parts(zoo.images().x)[part]
    assert_close(arrays["targets/logits"], expected, "float32")
    assert manifest["targets"]["logits"]["select"] == resolved
    assert manifest["targets"]["logits"]["shape"] == list(expected.shape[1:])


HEADLESS = "the teacher's output has no 'logits' (a model without a head, e.g. a Hugging Face *Model): its {!r} is stored as 'logits'"


@pytest.mark.parametrize("factory, select, field", [
    ("encoder_out", None, "pooler_output"),  # a model without a head (BertModel): the default took a field that is no logits
    ("encoder_out", "pooler_output", None),  # chosen on purpose: not said
    ("dict_out", None, None),  # its logits
    ("tuple_out", None, None),  # element "0": no field of a named output
])
def test_a_headless_teacher_s_field_stored_as_logits_is_said(tmp_path, capsys, factory, select, field):
    """A teacher whose output has no logits has its ``pooler_output`` (or ``last_hidden_state``) stored as ``logits`` by the
    default select, which kl and mse compare as logits: the dry run's warnings and a real extract's stderr say so, naming the
    field and the settings (targets.logits = false with targets.layers, or targets.select); a select set to it is not said."""
    overrides = [f"teacher.factory=extract_zoo.py:{factory}", "targets.layers=[]", *([f'targets.select.logits="{select}"'] if select else [])]
    said = [w for w in kdcache.dry_run(make_pipeline(*overrides))["warnings"] if "has no 'logits'" in w]
    kdcache.extract(make_pipeline(*overrides), str(tmp_path / "s.zarr"))
    printed = [line for line in capsys.readouterr().err.splitlines() if "has no 'logits'" in line]
    if field is None:
        assert said == printed == []
        return
    assert len(said) == 1 and said[0].startswith(HEADLESS.format(field)), said
    assert "set targets.logits = false and hook modules in targets.layers" in said[0]
    assert f"or set targets.select.logits = {field!r}" in said[0]
    assert printed == [f"warning: {said[0]}"]


def test_a_hugging_face_model_without_a_head_is_said(tmp_path):
    """transformers' BertModel (no head: pooler_output and last_hidden_state, no logits), built from a config."""
    tf = pytest.importorskip("transformers")
    toml = tmp_path / "p.toml"
    (tmp_path / "bert.py").write_text(
        "import torch\nimport transformers as tf\n\n"
        "def teacher():\n    torch.manual_seed(0)\n"
        "    return tf.BertModel(tf.BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, "
        "intermediate_size=32, max_position_embeddings=16))\n\n"
        "def dataset(split):\n    ids = torch.arange(24).remainder(31).add(1).reshape(4, 6)\n"
        "    return [{'input_ids': i, 'attention_mask': torch.ones_like(i)} for i in ids]\n")
    toml.write_text('[teacher]\nfactory = "bert.py:teacher"\n[data]\nfactory = "bert.py:dataset"\n[extract]\ndevice = "cpu"\n')
    report = kdcache.dry_run(kdcache.load_pipeline(toml))
    assert report["targets"]["logits"]["select"] == "pooler_output", tf.__version__
    assert any(w.startswith(HEADLESS.format("pooler_output")) for w in report["warnings"]), report["warnings"]


def test_output_auto_cannot_pick_from_names_it_does_not_know(tmp_path):
    out = tmp_path / "store.zarr"
    with pytest.raises(TargetError, match=r"target 'logits': cannot pick a tensor from an output of type dict \(its keys: 'feats'\); set \[targets.select\]"):
        kdcache.extract(make_pipeline("teacher.factory=extract_zoo.py:unnamed_out", "targets.layers=[]"), str(out))
    assert not out.exists()


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        (['targets.select.logits="nope"', "teacher.factory=extract_zoo.py:dict_out", "targets.layers=[]"],
         TargetError, r"target 'logits': output of type dict has no element 'nope' \(it holds 'logits', 'hidden'\); "
                      r"fix \[targets.select\] 'logits' \(e.g. 'logits'\)$"),
        (['targets.select.logits="5"', "teacher.factory=extract_zoo.py:tuple_out", "targets.layers=[]"],
         TargetError, r"output of type tuple has no element '5' \(it holds \"0\", \"1\"\)"),
        # a Hugging Face ModelOutput without output_hidden_states=True: its hidden_states is None, which the error names
        (['targets.select.logits="hidden_states.0"', "teacher.factory=extract_zoo.py:model_output_out", "targets.layers=[]"],
         TargetError, r"^target 'logits': output of type ModelOutputLike has no element 'hidden_states' \(it holds 'logits'\); "
                      r"its 'hidden_states' is None: the model returned nothing there \(.*output_hidden_states=True.*\); "
                      r"fix \[targets.select\] 'logits' \(e.g. 'logits'\)$"),
        (['targets.select.logits="99"'], TargetError, r"target 'logits': index 99 is outside the \d+ entries of the sample's first axis"),
        (['targets.select.logits="final"'], TargetError, r"output of type Tensor \(per-sample shape \[\d+\]\) has no element 'final'; .* "
                                                         r"\"mean\", \"last\" or \"transpose\""),
        (['targets.select.conv2="0"'], PipelineError, r"targets.select names \['conv2'\], which are not stored targets"),
        # a ZeroDivisionError named as a store that cannot be created
        (["teacher.factory=extract_zoo.py:empty_out", "targets.layers=[]"], TargetError,
         r"^target 'logits' has no values per sample \(per-sample shape \[0\]\), so there is nothing to store or distil; .*"),
    ],
)
def test_bad_select_fails_before_a_store_exists(tmp_path, overrides, error, match):
    out = tmp_path / "store.zarr"
    with pytest.raises(error, match=match):
        kdcache.extract(make_pipeline(*overrides), str(out))
    assert not out.exists()


def test_mean_of_an_axis_without_entries_is_named_not_nan():
    """A ``mean`` step over a first axis of size 0 gave NaN rows (stored as if the teacher had produced NaN); an index or a
    slice of it was already an error."""
    from kdcache.teacher import select

    with pytest.raises(TargetError, match=r"target 'x': 'mean' averages the sample's first axis, which has no entries \(per-sample "
                                          r"shape \[0, 3\]\); fix \[targets.select\] 'x'"):
        select((torch.zeros(2, 0, 3),), "0.mean", "x")
    assert select((torch.ones(2, 1, 3),), "0.mean", "x")[0].tolist() == [[1.0] * 3] * 2


@pytest.mark.parametrize("select", [None, {"attn": "1", "lstm": "0"}])
def test_hooked_layers_whose_output_is_a_tuple(tmp_path, select):
    overrides = ["teacher.factory=extract_zoo.py:recurrent", "targets.layers=['attn', 'lstm']", "targets.dtype=float32"]
    for name, value in (select or {}).items():
        overrides.append(f'targets.select.{name}="{value}"')
    manifest, arrays = extract(tmp_path, *overrides)
    model, x = zoo.recurrent(), zoo.images().x
    with torch.no_grad():
        s = model.proj(x[:, 0])
        attn_out, attn_weights = model.attn(s, s, s)  # (B, 4, 8), (B, 4, 4)
        lstm_out = model.lstm(attn_out)[0]  # (B, 4, 6)
        logits = model.head(lstm_out[:, -1])
    assert_close(arrays["targets/layers/attn"], attn_weights if select else attn_out, "float32")
    assert_close(arrays["targets/layers/lstm"], lstm_out, "float32")
    assert_close(arrays["targets/logits"], logits, "float32")
    assert manifest["targets"]["attn"]["select"] == ("1" if select else "0")
    assert manifest["targets"]["lstm"]["select"] == "0"


def test_transformer_encoder_with_dotted_module_names(tmp_path):
    layers = ["encoder.layers.1", "encoder.layers.0.linear2"]
    manifest, arrays = extract(tmp_path, "teacher.factory=extract_zoo.py:text_encoder", "data.factory=extract_zoo.py:tokens",
                               f"targets.layers={layers!r}", "targets.dtype=float32", "extract.batch_size=8")
    dataset, model = zoo.tokens(), zoo.text_encoder()
    # the encoder layer written out step by step (post-norm, ReLU, no dropout)
    layer0, layer1 = model.encoder.layers
    with torch.no_grad():
        h0 = model.embed(dataset.tokens) * dataset.scale[:, None, None]  # (50, 6, 16)
        a = layer0.norm1(h0 + layer0.self_attn(h0, h0, h0, need_weights=False)[0])
        linear2 = layer0.linear2(torch.relu(layer0.linear1(a)))  # (50, 6, 16)
        h1 = layer0.norm2(a + linear2)
        h2 = layer1(h1)
        logits = model.head(h2.mean(1))
    assert set(manifest["targets"]) == {"logits", *layers}
    assert manifest["targets"]["encoder.layers.1"]["path"] == "targets/layers/encoder.layers.1"
    tol = {"rtol": 1e-4, "atol": 1e-5}  # fused attention kernels differ from the step-by-step version in the last bits
    np.testing.assert_allclose(arrays["targets/layers/encoder.layers.0.linear2"], linear2.numpy(), **tol)
    np.testing.assert_allclose(arrays["targets/layers/encoder.layers.1"], h2.numpy(), **tol)
    np.testing.assert_allclose(arrays["targets/logits"], logits.numpy(), **tol)


def test_hooked_module_followed_by_an_inplace_op_keeps_its_own_output(tmp_path):
    _, arrays = extract(tmp_path, "teacher.factory=extract_zoo.py:inplace_after_conv", "targets.layers=['conv']", "targets.dtype=float32")
    model, x = zoo.inplace_after_conv(), zoo.images().x
    with torch.no_grad():
        conv = model.conv(x)
    assert (conv < 0).any()
    assert_close(arrays["targets/layers/conv"], conv, "float32")


@pytest.mark.parametrize("factory", ["namedtuple_out", "dataclass_inner"])
def test_hooked_structured_output_followed_by_an_inplace_op_keeps_its_own_output(tmp_path, factory):
    """A hooked module's namedtuple or dataclass output keeps its values as the module returned them (a dataclass's
    tensors were not copied: the store held what a later in-place op made of them), and a namedtuple's fields are
    chosen by name, on a hooked module and on the model's own output (they were refused: 'has no element')."""
    _, arrays = extract(tmp_path, f"teacher.factory=extract_zoo.py:{factory}", "targets.layers=['inner']",
                        'targets.select={inner = "hidden", logits = "hidden"}', "targets.dtype=float32")
    model, x = getattr(zoo, factory)(), zoo.images().x
    with torch.no_grad():
        hidden = model.inner.conv(x).flatten(1)
    assert (hidden < 0).any()
    assert_close(arrays["targets/layers/inner"], hidden, "float32")
    assert_close(arrays["targets/logits"], hidden.clamp(min=0), "float32")


def test_hooked_layer_of_a_padded_transformer_encoder_is_named_not_a_traceback(tmp_path):
    """With a padding mask, nn.TransformerEncoder's eval fast path hands its layers nested tensors, which have no shape
    (``.shape`` raised 'NestedTensorImpl doesn't support sizes', a traceback); the encoder's own output is padded."""
    tokens = ["teacher.factory=extract_zoo.py:padded_encoder", "data.factory=extract_zoo.py:tokens", "targets.dtype=float32"]
    out = tmp_path / "store.zarr"
    with pytest.raises(TargetError, match=r"^target 'encoder.layers.0': the output is a nested tensor .*enable_nested_tensor=False$"):
        kdcache.extract(make_pipeline(*tokens, "targets.layers=['encoder.layers.0']"), str(out))
    assert not out.exists()
    dataset, model = zoo.tokens(), zoo.padded_encoder()
    for factory, layer in (("padded_encoder", "encoder"), ("padded_encoder_dense", "encoder.layers.0")):
        _, arrays = extract(tmp_path, *tokens, f"teacher.factory=extract_zoo.py:{factory}", f"targets.layers=['{layer}']",
                            name=f"{factory}.zarr")
        model = getattr(zoo, factory)()
        with torch.no_grad():  # each sample alone
            logits = torch.cat([model(**{k: v[None] for k, v in dataset[i].items() if k != "label"}) for i in range(len(dataset))])
        np.testing.assert_allclose(arrays["targets/logits"], logits.numpy(), rtol=1e-4, atol=1e-5)
        assert arrays[f"targets/layers/{layer}"].shape == (len(dataset), 6, 16)


def test_hooked_module_that_runs_twice_per_forward_is_ambiguous(tmp_path):
    out = tmp_path / "store.zarr"
    with pytest.raises(TargetError, match=r"layer 'act' ran more than once in one forward pass .*hook a module that runs once"):
        kdcache.extract(make_pipeline("teacher.factory=extract_zoo.py:shared_act", "targets.layers=['act']"), str(out))
    assert not out.exists()
    _, arrays = extract(tmp_path, "teacher.factory=extract_zoo.py:shared_act", "targets.layers=['conv']", name="ok.zarr")
    assert arrays["targets/layers/conv"].shape == (50, 3, 4, 4)


def test_hooked_module_that_never_runs(tmp_path):
    out = tmp_path / "store.zarr"
    with pytest.raises(TargetError, match=r"layer 'spare' .*did not run"):
        kdcache.extract(make_pipeline("teacher.factory=extract_zoo.py:unused", "targets.layers=['spare']"), str(out))
    assert not out.exists()


def test_hooked_module_that_stops_running_is_an_error_not_stale_rows(tmp_path):
    """``branch`` runs for the probe batch (indices < 20) only; its old output must not fill later rows."""
    out = tmp_path / "store.zarr"
    with pytest.raises(TargetError, match=r"layer 'branch' .*did not run"):
        kdcache.extract(make_pipeline("teacher.factory=extract_zoo.py:unused", "targets.layers=['branch']"), str(out))
    store = open_store(out)
    assert store.done().tolist() == [True, False, False, False]  # rows 0..15 are good, rows 16.. never written


# ----------------------------------------------------------------------------------- refusals before work


@pytest.mark.parametrize(
    "factory, layer, match",
    [
        ("first_pixel", "con", r"layer 'con' is not a module of the teacher; did you mean 'conv'"),
        ("first_pixel", "fc1", r"did you mean 'fc'"),
        ("first_pixel", "features.3", r"layer 'features.3' is not a module of the teacher; the model has 3 modules, e\.g\. conv, act, fc"),
        ("text_encoder", "encoder.layer.1", r"did you mean 'encoder.layers.1'"),
        ("text_encoder", "encoder.layers.0.linear3", r"'encoder.layers.0.linear2'"),
    ],
)
def test_unknown_layer_lists_close_matches_and_creates_nothing(tmp_path, factory, layer, match):
    out = tmp_path / "store.zarr"
    pipeline = make_pipeline(f"teacher.factory=extract_zoo.py:{factory}", f"targets.layers=['{layer}']")
    with pytest.raises(TargetError, match=match):
        kdcache.extract(pipeline, str(out))
    assert not out.exists()
    with pytest.raises(TargetError, match=match):
        kdcache.dry_run(pipeline)


class _Raising(torch.utils.data.Dataset):
    def __init__(self, error: Exception):
        self.error = error

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int):
        raise self.error


@pytest.mark.parametrize("error", [DataError("dataset index 0: simulated; fix the dataset"), RuntimeError("boom; a builtin's")])
def test_a_dataloader_workers_error_has_its_own_message_back(error):
    """torch's DataLoader re-raises a worker's error as its class holding "Caught X in DataLoader worker process N." and
    the worker's traceback; errors.worker_message gives back its own message, a builtin's too (torch writes its class
    bare: "RuntimeError: ...", which was left in, "RuntimeError: RuntimeError: ..." once a message named its class)."""
    from kdcache.data import stop_making
    from kdcache.errors import worker_message

    batches = iter(torch.utils.data.DataLoader(_Raising(error), num_workers=1))
    with pytest.raises(type(error)) as raised:
        try:
            list(batches)
        finally:
            stop_making(batches)  # not left to the garbage collector: torch's 5 s join, paid by a later test
    assert str(raised.value).startswith("Caught ") and worker_message(raised.value) == str(error)
    assert worker_message(error) == str(error)  # not a worker's: as it is


@pytest.mark.parametrize(
    "overrides, env, match",
    [
        (["targets.logits=false", "targets.layers=[]"], {}, r"nothing to store; set targets.logits = true or list targets.layers"),
        (["extract.batch_size=0"], {}, r"extract.batch_size must be >= 1, got 0"),
        ([], {"N": 0}, r"extract_zoo.py:images\('train'\) is empty"),
        (["teacher.factory=extract_zoo.py:not_a_module"], {}, r"teacher.factory returned str, not a torch.nn.Module"),
        (["teacher.factory="], {}, r"teacher.factory is required"),
        (["extract.device=tpu"], {}, r"^<test>: extract.device = 'tpu' is not a torch device"),
    ],
)
def test_invalid_pipeline_fails_before_a_store_exists(tmp_path, zoo_env, overrides, env, match):
    zoo_env(**env)
    out = tmp_path / "store.zarr"
    with pytest.raises(PipelineError, match=match):
        kdcache.extract(make_pipeline(*overrides), str(out))
    assert not out.exists()


@pytest.mark.parametrize("overrides, match", [
    (["targets.logits=false", "targets.layers=[]"], r"^override 'targets.logits=false': nothing to store"),
    (["targets.layers=['logits']"], r"^override \"targets.layers=\['logits'\]\": a layer named 'logits' would clash"),
    (["teacher.factory="], r"^override 'teacher.factory=': teacher.factory is required"),
], ids=["nothing-to-store", "layer-named-logits", "factory-required"])
def test_a_targets_error_names_the_override_that_gave_the_value(tmp_path, overrides, match):
    """README (Pipeline files): an error about a value names where it came from. These two named the pipeline file, which
    set neither value (``--layers logits``: "mnist.toml: a layer named 'logits' would clash ...")."""
    (tmp_path / "named.py").write_text("import torch\n\nclass Named(torch.nn.Module):\n    def __init__(self):\n"
                                       "        super().__init__()\n        self.logits = torch.nn.Flatten()\n\n"
                                       "    def forward(self, x):\n        return self.logits(x)[:, :3]\n\n"
                                       "def teacher():\n    return Named()\n")
    toml = write_toml(tmp_path / "p.toml", f"teacher.factory={tmp_path / 'named.py'}:teacher", "targets.layers=[]")
    with pytest.raises(PipelineError, match=match):
        kdcache.dry_run(kdcache.load_pipeline(toml, overrides))


def test_out_that_is_a_file_or_a_foreign_folder_is_refused(tmp_path):
    file = tmp_path / "notes.txt"
    file.write_text("keep me")
    with pytest.raises(StoreError, match=r"notes.txt.* not a kdcache store"):
        kdcache.extract(make_pipeline(), str(file))
    folder = tmp_path / "project"
    (folder / "src").mkdir(parents=True)
    (folder / "src" / "main.py").write_text("keep me")
    for overwrite in (False, True):  # --overwrite replaces a store, never a folder of other things
        with pytest.raises(StoreError, match=r"'.*project' exists and is not a kdcache store"):
            kdcache.extract(make_pipeline(), str(folder), overwrite=overwrite)
    assert file.read_text() == "keep me" and (folder / "src" / "main.py").read_text() == "keep me"


def test_empty_existing_folder_is_used(tmp_path):
    out = tmp_path / "empty.zarr"
    out.mkdir()
    assert kdcache.extract(make_pipeline(), str(out))["complete"]


# ----------------------------------------------------------------------------------- non-finite values


@pytest.mark.parametrize("factory, layers, target", [("overflow_logits", [], "logits"), ("overflow_layer", ["amp"], "amp")])
def test_float16_overflow_names_the_target_and_writes_no_inf(tmp_path, factory, layers, target):
    out = tmp_path / "store.zarr"
    pipeline = make_pipeline(f"teacher.factory=extract_zoo.py:{factory}", f"targets.layers={layers!r}")
    # 4000 * index passes 65504 at index 17, in shard 1 (rows 16..31)
    with pytest.raises(TargetError, match=rf"target '{target}' \(rows 16\.\.23\) has values beyond the float16 range .*targets.dtype = \"float32\""):
        kdcache.extract(pipeline, str(out))
    _, arrays = read_store(out)
    assert arrays["progress/done"].tolist() == [True, False, False, False]
    for path, values in arrays.items():
        if values.dtype.kind == "f":
            assert np.isfinite(values).all(), path
    path = "targets/logits" if target == "logits" else "targets/layers/amp"
    np.testing.assert_array_equal(arrays[path][:16, 0], 4000 * np.arange(16, dtype=np.float16))

    _, arrays = extract(tmp_path, f"teacher.factory=extract_zoo.py:{factory}", f"targets.layers={layers!r}", "targets.dtype=float32", name="f32.zarr")
    np.testing.assert_array_equal(arrays[path][:, 0], 4000 * np.arange(50, dtype=np.float32))


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("logits, layers, target", [(True, [], "logits"), (False, ["mark"], "mark")])
def test_nan_from_the_teacher_is_an_error(tmp_path, dtype, logits, layers, target):
    out = tmp_path / "store.zarr"
    pipeline = make_pipeline("teacher.factory=extract_zoo.py:nan_at_30", f"targets.logits={str(logits).lower()}",
                             f"targets.layers={layers!r}", f"targets.dtype={dtype}")
    with pytest.raises(TargetError, match=rf"the teacher produced NaN in target '{target}' \(rows 24\.\.31\)"):
        kdcache.extract(pipeline, str(out))
    _, arrays = read_store(out)
    assert arrays["progress/done"].tolist() == [True, False, False, False]
    assert not any(np.isnan(v).any() for v in arrays.values() if v.dtype.kind == "f")


@pytest.mark.parametrize("factory, dtype, message", [
    ("huge_float64", "float32", r"has values beyond the float32 range \(±3\.40282e\+38\) of targets\.dtype: the teacher's float64 output "
                                r"is finite but reaches ±1e\+300; scale them into range in the model"),
    ("huge_float64", "float16", r"has values beyond the float16 range \(±65504\) of targets\.dtype: the teacher's float64 output "
                                r"is finite but reaches ±1e\+300; scale them"),
    ("beyond_float16_in_float64", "float16", r"has values beyond the float16 range \(±65504\) of targets\.dtype: the teacher's "
                                             r"float64 output is finite but reaches ±1e\+05; set targets\.dtype = \"float32\""),
    ("inf_at_17", "float16", r"the teacher produced inf in target 'logits' \(rows {rows}\); check the model and its inputs"),
    ("inf_at_17", "float32", r"the teacher produced inf in target 'logits' \(rows {rows}\); check the model and its inputs \("),
    ("minus_inf_at_17", "float16", r"the teacher produced -inf in target 'logits' \(rows {rows}\): a class masked with -inf "
                                   r"\(probability zero\) cannot be stored; give it a large finite negative instead, e.g\. "
                                   r"logits\.masked_fill\(mask, -1e4\) in the model's forward \(softmax still gives it 0\), or "
                                   r"check the model and its inputs \("),
])
def test_inf_once_stored_is_named_as_the_teacher_s_or_as_beyond_targets_dtype(tmp_path, factory, dtype, message):
    """An inf among the converted values is the teacher's own, or a finite value beyond targets.dtype (a float64 1e300
    stored as float32 was 'the teacher produced inf', a float32 inf stored as float16 'set targets.dtype = float32'):
    the batch is run through the teacher again to say which, in the run (either writer) and the dry run."""
    import importlib

    from kdcache import store as layout
    from kdcache.progress import Progress

    match = (message if message.startswith("the teacher") else r"target 'logits' \(rows {rows}\) " + message).format
    overrides = (f"teacher.factory=extract_zoo.py:{factory}", "targets.layers=[]", f"targets.dtype={dtype}")
    with pytest.raises(TargetError, match=match(rows=r"16\.\.23")):
        kdcache.extract(make_pipeline(*overrides), str(tmp_path / "store.zarr"))
    _, arrays = read_store(tmp_path / "store.zarr")
    assert arrays["progress/done"].tolist() == [True, False, False, False]
    assert all(np.isfinite(v).all() for v in arrays.values() if v.dtype.kind == "f")
    kx = importlib.import_module("kdcache.extract")
    run = kx.setup(make_pipeline(*overrides))
    store = layout.create_or_resume(str(tmp_path / "thread.zarr"), run.manifest_for(make_pipeline(*overrides)))
    with pytest.raises(TargetError, match=match(rows=r"16\.\.23")):
        kx.extract_shards(run, make_pipeline(*overrides), store, list(range(store.num_shards)), Progress(0, "", enabled=False), background=True)
    with pytest.raises(TargetError, match=match(rows=r"0\.\.31")):
        kdcache.dry_run(make_pipeline(*overrides, "extract.batch_size=32"))


@pytest.mark.parametrize("factory", ["inf_once", "inf_then_raises"])
def test_inf_once_stored_from_a_teacher_that_does_not_run_the_same_again_names_both_causes(tmp_path, factory):
    """The batch run through the teacher again to tell an inf of its own from a value beyond targets.dtype gives finite
    values this time, or raises: which it was is not known, and the error's own text, naming both, stands."""
    overrides = (f"teacher.factory=extract_zoo.py:{factory}", "targets.layers=[]", "targets.dtype=float16")
    with pytest.raises(TargetError, match=r"^target 'logits' \(rows 16\.\.23\) holds inf once stored as float16: the teacher produced inf, "
                                          r"or finite values beyond the float16 range \(±65504\); check the model and its inputs, or "
                                          r"set targets\.dtype = \"float32\""):
        kdcache.extract(make_pipeline(*overrides), str(tmp_path / "store.zarr"))
    _, arrays = read_store(tmp_path / "store.zarr")
    assert arrays["progress/done"].tolist() == [True, False, False, False]


def test_a_teacher_that_raises_on_a_reordered_batch_is_left_to_its_own_batches(tmp_path):
    """The setup's check of the probe batch with its samples moved one place is skipped where the teacher raises on that
    batch (it takes batches in one order only): the run's batches, in dataset order, are what it must take, and are stored."""
    _, arrays = extract(tmp_path, "teacher.factory=extract_zoo.py:in_order_only", "targets.layers=[]")
    np.testing.assert_array_equal(arrays["targets/logits"][:, 0], np.arange(50, dtype=np.float16))


def test_finite_values_whose_sum_overflows_are_stored(tmp_path):
    # to_host's quick check is a float32 sum per batch; inf there must lead to a look at the values, not an error
    _, arrays = extract(tmp_path, "teacher.factory=extract_zoo.py:huge_float32", "targets.layers=[]", "targets.dtype=float32")
    np.testing.assert_array_equal(arrays["targets/logits"][:, 0], np.arange(50, dtype=np.float32))
    assert (arrays["targets/logits"][:, 1:] == np.float32(3e38)).all()


@pytest.mark.parametrize("factory", ["", "extract_zoo.py:nan_at_30"], ids=["store", "nan-error"])
def test_the_writer_thread_gathers_what_the_loop_does(tmp_path, factory):
    """A CPU teacher gathers shards in its own loop; a GPU teacher in a writer thread. The thread path,
    run here on the CPU, gives the same store, and its errors reach the caller the same way."""
    import importlib

    from kdcache import store as layout
    from kdcache.progress import Progress

    kx = importlib.import_module("kdcache.extract")
    overrides = [f"teacher.factory={factory}", "targets.layers=[]"] if factory else []
    pipeline = make_pipeline(*overrides)
    run = kx.setup(pipeline)
    store = layout.create_or_resume(str(tmp_path / "thread.zarr"), run.manifest_for(pipeline))
    write = lambda: kx.extract_shards(run, pipeline, store, list(range(store.num_shards)), Progress(0, "", enabled=False), background=True)  # noqa: E731
    if factory:
        with pytest.raises(TargetError, match=r"the teacher produced NaN in target 'logits' \(rows 24\.\.31\)"):
            write()
        assert read_store(tmp_path / "thread.zarr")[1]["progress/done"].tolist() == [True, False, False, False]
        return
    write()
    store.finish()
    _, inline = extract(tmp_path, *overrides, name="inline.zarr")
    _, thread = read_store(tmp_path / "thread.zarr")
    assert inline.keys() == thread.keys()
    for path in inline:
        np.testing.assert_array_equal(thread[path], inline[path], err_msg=path)


# ----------------------------------------------------------------------------------- resume


def test_interrupted_run_leaves_whole_shards_and_resume_fetches_only_the_rest(tmp_path, zoo_env, fetch_log):
    out = crash_at(tmp_path, zoo_env, 42)  # batch 32..39 of shard 2 arrived, 40..47 did not
    store = open_store(out)
    assert store.done().tolist() == [True, True, False, False]
    assert not store.complete and store.samples_done() == 32
    _, partial = read_store(out)
    assert not partial["samples/index"][32:].any()  # the half-gathered shard was not written
    np.testing.assert_array_equal(partial["samples/index"][:32], np.arange(32))

    fetch_log(clear=True)
    info = kdcache.extract(make_pipeline(), str(out))
    assert info["complete"] and info["samples_done"] == 50
    fetched = Counter(fetch_log())
    probe = set(range(8)) | {49}  # setup's probe batch and fingerprints, not shard work
    kx = importlib.import_module("kdcache.extract")
    rechecked = [i for i in fetched if i < 32 and i not in probe]  # the resume's check of a few done rows: read once each, no teacher work
    assert len(rechecked) <= 2 * kx.RESUMED_ROWS and all(fetched[i] == 1 for i in rechecked), "rows of done shards were fetched again"
    assert all(fetched[i] >= 1 for i in range(32, 50))
    assert all(fetched[i] == 1 for i in range(32, 50) if i not in probe)

    manifest, resumed = read_store(out)
    reference_manifest, reference = extract(tmp_path, name="reference.zarr")
    assert without_times(manifest) == without_times(reference_manifest)
    assert resumed.keys() == reference.keys()
    for path in reference:
        assert resumed[path].dtype == reference[path].dtype
        np.testing.assert_array_equal(resumed[path], reference[path], err_msg=path)


def test_a_ctrl_c_while_a_failed_extract_waits_for_its_last_shard_write_is_raised_once_the_write_has_ended(tmp_path, zoo_env, monkeypatch):
    """A Ctrl-C (or torch's SIGCHLD handler reporting a dead DataLoader worker) while an extract that failed waits for the
    shard write under way was taken for that write's error and dropped (the Ctrl-C lost, the wait for that write over),
    or cut the wait short (the write landing after extract had raised and released the store's lock: a shard marked
    done behind a rerun's back). It is raised once the write has ended: the store is settled as extract raises."""
    import os
    import signal
    import threading
    import time

    kx, layout = importlib.import_module("kdcache.extract"), importlib.import_module("kdcache.store")
    ending, written, real_write, real_exit = threading.Event(), [], layout.Store.write_shard, kx.ShardWriter.__exit__

    def exit_(self, *exc):
        ending.set()
        return real_exit(self, *exc)

    def slow_write(self, shard, arrays):  # shard 1's write is under way as the run fails at row 36; a Ctrl-C lands in the wait
        if shard == 1:
            assert ending.wait(30), "the run did not fail"
            time.sleep(0.2)
            os.kill(os.getpid(), signal.SIGALRM)  # handled in the main thread, which waits for this write
            time.sleep(0.5)
        real_write(self, shard, arrays)
        written.append(shard)

    def ctrl_c(signum, frame):
        raise KeyboardInterrupt

    monkeypatch.setattr(layout.Store, "write_shard", slow_write)
    monkeypatch.setattr(kx.ShardWriter, "__exit__", exit_)
    previous, out = signal.signal(signal.SIGALRM, ctrl_c), tmp_path / "store.zarr"
    zoo_env(FAIL_AT=36)
    try:
        with pytest.raises(KeyboardInterrupt):
            kdcache.extract(make_pipeline(), str(out))
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert written == [0, 1], "extract raised before its last shard write had ended"
    assert open_store(out).done().tolist() == [True, True, False, False]


def test_resume_names_the_first_five_done_shards_whose_objects_are_missing_and_counts_the_rest(numbered_store, tmp_path, capfd):
    """Six of the 7 done shards lost their logits object (an incomplete copy): the note names the first five, one line
    each, and counts the sixth; all are written again, each row its sample's."""
    import shutil

    out = tmp_path / "copy.zarr"
    shutil.copytree(numbered_store, out)
    for shard in range(6):
        (out / f"targets/logits/c/{shard}/0").unlink()
    info = kdcache.extract(from_dict(NUMBERED, root=FIXTURES), str(out))
    assert info["complete"]
    notes = [line for line in capfd.readouterr().err.splitlines() if line.startswith("note: ")]
    assert [int(n.split(": shard ")[1].split()[0]) for n in notes[:5]] == [0, 1, 2, 3, 4]
    assert notes[5:] == [f"note: {str(out)!r}: 1 more shard marked done misses objects; it is pending again too"], notes
    np.testing.assert_array_equal(open_store(str(out)).read("targets/logits", 0, 100)[:, 0], np.arange(100, dtype=np.float32))


@pytest.mark.parametrize("lost", ["targets/layers/conv/c/1/0/0/0", "samples/fingerprint/c/1", "progress/digest/c/1/0", "empty"])
def test_resume_redoes_a_done_shard_whose_object_is_missing(tmp_path, zoo_env, fetch_log, capfd, lost):
    """A shard marked done whose object is gone (deleted, an incomplete copy of the store) or empty: resume skipped it
    as done, and the store stayed damaged (every read of it refused) until the user deleted its marker by hand. Resume
    now takes it as pending (a note names it), fetches its rows again and writes them whole: the store equals a fresh
    extract's, row for row, and the other done shard is left as it was."""
    out = crash_at(tmp_path, zoo_env, 42)  # shards 0 and 1 done
    if lost == "empty":
        lost = "targets/logits/c/1/0"
        (out / lost).write_bytes(b"")
    else:
        (out / lost).unlink()
    shard_0 = {k: t for k, t in mtimes(out).items() if "/c/0" in k}
    assert len(shard_0) == 8  # 6 data arrays, the digest row, the marker
    fetch_log(clear=True)
    info = kdcache.extract(make_pipeline(), str(out))
    assert info["complete"] and info["samples_done"] == 50
    err = capfd.readouterr().err
    assert f"note: {str(out)!r}: shard 1 (rows 16-31) was marked done but its object {lost!r} is " in err, err
    assert "it is pending again" in err and "shard 0" not in err, err
    fetched = Counter(fetch_log())
    probe = set(range(8)) | {49}
    rechecked = [i for i in fetched if i < 16 and i not in probe]  # the resume's check of a few done rows' inputs (no teacher work)
    assert len(rechecked) <= importlib.import_module("kdcache.extract").RESUMED_ROWS and all(fetched[i] == 1 for i in rechecked), \
        "rows of the intact done shard were fetched again"
    assert all(fetched[i] == 1 for i in range(16, 49))
    assert {k: t for k, t in mtimes(out).items() if "/c/0" in k} == shard_0

    manifest, resumed = read_store(out)
    reference_manifest, reference = extract(tmp_path, name="reference.zarr")
    assert without_times(manifest) == without_times(reference_manifest) and resumed.keys() == reference.keys()
    for path in reference:
        np.testing.assert_array_equal(resumed[path], reference[path], err_msg=path)
    np.testing.assert_array_equal(resumed["targets/logits"][:, 0], np.arange(50, dtype=np.float16))  # each row its sample's
    assert file_bytes(out) == file_bytes(tmp_path / "reference.zarr")


def test_a_redo_stopped_on_the_way_leaves_its_shard_pending(tmp_path, zoo_env):
    """The marker of a done shard that lost an object is cleared before the shard is written again: a run stopped
    while redoing it leaves it pending (never done with the objects of two attempts), and the next run completes it."""
    out = crash_at(tmp_path, zoo_env, 42)
    (out / "samples/index/c/1").unlink()
    crash_at(tmp_path, zoo_env, 20)  # the redo of shard 1 (rows 16-31) dies fetching row 20
    assert open_store(out).done().tolist() == [True, False, False, False]
    assert kdcache.extract(make_pipeline(), str(out))["complete"]
    extract(tmp_path, name="reference.zarr")
    assert file_bytes(out) == file_bytes(tmp_path / "reference.zarr")


def test_resume_with_every_object_there_looks_once_per_array_and_rewrites_nothing(tmp_path, zoo_env, capfd, monkeypatch):
    """The check for missing objects looks at each array's objects once (one listing on an object store, a stat per
    object locally), and a store whose done shards are whole resumes as before (no note, nothing of them rewritten)."""
    from kdcache import store as layout

    out = crash_at(tmp_path, zoo_env, 42)
    store = open_store(out, mode="r+")
    assert store.unbacked_shards() == {}
    before = {k: t for k, t in mtimes(out).items() if "/c/0" in k or "/c/1" in k}
    looked: list[str] = []
    sizes = layout.Store._object_sizes
    monkeypatch.setattr(layout.Store, "_object_sizes", lambda self, prefix, keys: looked.append(prefix) or sizes(self, prefix, keys))
    kdcache.extract(make_pipeline(), str(out))
    arrays = store.paths() + [layout.DIGEST]
    assert sorted(looked) == sorted(f"{path}/c" for path in arrays), looked
    assert {k: t for k, t in mtimes(out).items() if "/c/0" in k or "/c/1" in k} == before
    assert "note:" not in capfd.readouterr().err


def test_resume_lists_each_folder_once_and_removes_the_dead_writers_temp_files(tmp_path, zoo_env, monkeypatch):
    """Stale temp files are looked up in one listing per folder, not one per shard write (quadratic on big stores)."""
    from kdcache import store as layout

    out = crash_at(tmp_path, zoo_env, 42)
    stale = [out / "samples" / "index" / "c" / ".2.999999.tmp", out / "targets" / "logits" / "c" / "3" / ".0.999999.tmp",
             out / "progress" / "done" / "c" / f"3.{'ab' * 16}.partial"]
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half")
    keep = out / "samples" / "index" / "c" / ".2.999999.tmp.keep"  # not a temp file name: never removed
    keep.write_bytes(b"x")
    listed: list[str] = []
    real = layout._temp_files
    monkeypatch.setattr(layout, "_temp_files", lambda folder: listed.append(str(folder)) or real(folder))
    kdcache.extract(make_pipeline(), str(out))
    assert not any(path.exists() for path in stale) and keep.exists()
    assert len(listed) >= 5 and len(listed) == len(set(listed)), "a folder was listed more than once"


def test_resume_with_another_batch_size_and_workers(tmp_path, zoo_env):
    out = crash_at(tmp_path, zoo_env, 20)
    kdcache.extract(make_pipeline("extract.batch_size=5", "extract.num_workers=2"), str(out))
    _, arrays = read_store(out)
    np.testing.assert_array_equal(arrays["samples/index"], np.arange(50))
    np.testing.assert_array_equal(arrays["targets/logits"][:, 0], np.arange(50, dtype=np.float16))


def test_a_failed_extract_stops_its_dataloader_workers_at_once(tmp_path, zoo_env):
    """An error raised in a worker keeps the DataLoader's iterator in its traceback (which a notebook keeps): the worker
    processes stop when extract raises, not when the traceback is dropped. The error has the worker's own message."""
    import multiprocessing
    import time

    before = set(multiprocessing.active_children())
    zoo_env(FAIL_AT=30)
    with pytest.raises(DataError, match="simulated crash fetching index 30") as raised:
        kdcache.extract(make_pipeline("extract.num_workers=2"), str(tmp_path / "s.zarr"))
    deadline = time.monotonic() + 60  # 10 s: tight for processes ending on a loaded box
    while set(multiprocessing.active_children()) - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert raised.value.__traceback__ is not None and set(multiprocessing.active_children()) - before == set()
    assert "\n" not in str(raised.value)  # the worker's own message, not torch's text and the worker's traceback around it


@pytest.mark.parametrize(
    "overrides, env, match",
    [
        ([], {"SEED": 1}, r"different teacher weights \(teacher.weights_sha256: store has '[0-9a-f]{16}"),
        ([], {"N": 40}, r"different dataset length \(dataset.length: store has 50, now 40\)"),
        (["data.split=unlabeled"], {}, r"different dataset split \(dataset.split: store has 'train', now 'unlabeled'\)"),
        (["targets.layers=['conv']"], {}, r"different targets \(targets.fc: store has \{'name': 'fc'.*now none\)"),
        (["targets.layers=['conv', 'fc', 'act']"], {}, r"different targets \(the store has no targets.act, now \{'name': 'act'"),
        (["targets.logits=false"], {}, r"different targets \(targets.logits: store has"),
        (["targets.dtype=float32"], {}, r"different targets \(targets.logits.dtype: store has 'float16', now 'float32'\)"),
        (["extract.rows_per_shard=8"], {}, r"different chunk/shard geometry \(geometry.rows_per_shard: store has 16, now 8\)"),
        (["extract.compression=none"], {}, r"different compression \(compression.codec: store has 'zstd', now 'none'\)"),
    ],
)
def test_resume_with_different_inputs_is_refused_naming_the_difference(tmp_path, zoo_env, overrides, env, match):
    out = crash_at(tmp_path, zoo_env, 20)
    before = mtimes(out)
    zoo_env(**env)
    with pytest.raises(StoreMismatchError, match=match) as caught:
        kdcache.extract(make_pipeline(*overrides), str(out))
    assert "or overwrite=True to start afresh" in str(caught.value)  # the Python argument, not the CLI's --overwrite
    assert mtimes(out) == before

    info = kdcache.extract(make_pipeline(*overrides), str(out), overwrite=True)
    assert info["complete"] and info["num_samples"] == int(env.get("N", 50))
    assert info["created"] is not None


@pytest.mark.parametrize("crash, pending", [(42, 32), (20, 16)], ids=["two-done-shards", "one-done-shard"])
def test_resume_on_a_dataset_whose_middle_changed_is_refused_before_the_teacher_runs(tmp_path, zoo_env, fetch_log, crash, pending):
    """The manifest's identity holds the dataset's length and the fingerprints of items 0 and N-1: a dataset re-listed in
    another order between them would make a store of two datasets. A few done rows are read again and compared, of
    every done shard where there are few (one alone too: ``check_done_rows`` once skipped the first it drew)."""
    out = crash_at(tmp_path, zoo_env, crash)  # the shards before row ``pending`` done
    before = mtimes(out)
    zoo_env(REVERSE_MIDDLE=1)
    fetch_log(clear=True)
    with pytest.raises(StoreMismatchError, match=r"was made from another dataset than data.factory's now: its done row (\d+) "
                                                 r"\(dataset index \1\) has input fingerprint [0-9a-f]{16}, the dataset now gives") as caught:
        kdcache.extract(make_pipeline(), str(out))
    assert "pass overwrite=True (or another out)" in str(caught.value) and "\n" not in str(caught.value)  # the Python arguments
    assert mtimes(out) == before
    assert not [i for i in fetch_log() if pending <= i < 49], "the teacher ran before the check"  # 49: setup's probe item
    zoo_env(REVERSE_MIDDLE=None)
    assert kdcache.extract(make_pipeline(), str(out))["complete"]  # the dataset restored: the store resumes


def test_complete_store_is_not_rewritten(tmp_path, zoo_env):
    out = tmp_path / "store.zarr"
    kdcache.extract(make_pipeline(), str(out))
    before = mtimes(out)
    info = kdcache.extract(make_pipeline(), str(out))
    assert info["complete"]
    assert mtimes(out) == before
    zoo_env(SEED=1)
    with pytest.raises(StoreMismatchError, match="different teacher weights"):
        kdcache.extract(make_pipeline(), str(out))
    assert mtimes(out) == before


def test_overwrite_replaces_a_complete_store(tmp_path, zoo_env):
    out = tmp_path / "store.zarr"
    kdcache.extract(make_pipeline(), str(out))
    zoo_env(N=20, SEED=3)
    kdcache.extract(make_pipeline("targets.layers=['fc']"), str(out), overwrite=True)
    manifest, arrays = read_store(out)
    assert manifest["num_samples"] == 20 and set(manifest["targets"]) == {"logits", "fc"}
    assert "targets/layers/conv" not in arrays
    assert arrays["progress/done"].tolist() == [True, True]
    model = zoo.first_pixel()
    with torch.no_grad():
        fc = model.fc(torch.relu(model.conv(zoo.images().x)).flatten(1))
    assert_close(arrays["targets/layers/fc"], fc, "float16")


# ----------------------------------------------------------------------------------- dry run


def test_dry_run_reports_shapes_and_bytes_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    report = kdcache.dry_run(make_pipeline())
    assert list(tmp_path.iterdir()) == []
    assert report["num_samples"] == 50 and report["has_labels"] is True
    assert {name: t["shape"] for name, t in report["targets"].items()} == {"logits": [50, 3], "conv": [50, 3, 4, 4], "fc": [50, 6]}
    assert {name: t["bytes_per_sample"] for name, t in report["targets"].items()} == {"logits": 6, "conv": 96, "fc": 12}
    assert report["bytes_per_sample"] == 6 + 96 + 12 + 3 * 8  # + index, fingerprint, label
    assert report["estimated_bytes_raw"] == 50 * report["bytes_per_sample"]
    assert report["geometry"]["rows_per_shard"] == 16 and report["geometry"]["num_shards"] == 4


def test_dry_run_given_out_checks_it_as_extract_would_and_writes_nothing(tmp_path, zoo_env):
    """``kdcache.dry_run`` took no ``out``: a pipeline was checked, never where extract would write it. Given one (with
    ``overwrite`` and ``storage_options``, as extract takes them) it refuses what extract would, in the API's words (``out``,
    ``overwrite=True``), and says what extract would do there; ``overwrite`` without an ``out`` is a TypeError."""
    partial = crash_at(tmp_path, zoo_env, 36)  # shards 0 and 1 done
    before = mtimes(partial)
    assert kdcache.dry_run(make_pipeline(), partial)["out"] == {"location": str(partial), "action": "resume", "again": False,
                                                               "shards_done": 2, "num_shards": 4, "redone": 0}
    assert kdcache.dry_run(make_pipeline(), out=str(partial), overwrite=True)["out"]["action"] == "replace"
    with pytest.raises(StoreMismatchError, match=r"was made with different targets .*; use the original pipeline to resume, or "
                                                 r"overwrite=True to start afresh$"):
        kdcache.dry_run(make_pipeline("targets.dtype=float32"), partial)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.md").write_text("keep")
    with pytest.raises(StoreError, match=r"'.*notes' exists and is not a kdcache store; choose another out or remove it$"):
        kdcache.dry_run(make_pipeline(), tmp_path / "notes")
    assert mtimes(partial) == before and sorted(p.name for p in tmp_path.iterdir()) == ["notes", "store.zarr"]
    assert kdcache.dry_run(make_pipeline())["out"] is None
    with pytest.raises(TypeError, match="dry_run's overwrite and storage_options apply to out"):
        kdcache.dry_run(make_pipeline(), overwrite=True)


@pytest.mark.parametrize("overrides, match", [
    (["teacher.factory=extract_zoo.py:nan_at_30", "targets.layers=[]"], r"the teacher produced NaN in target 'logits' \(rows 0\.\.31\)"),
    (["teacher.factory=extract_zoo.py:overflow_layer", "targets.layers=['amp']"], r"target 'amp' \(rows 0\.\.31\) has values beyond"),
], ids=["nan", "float16-overflow"])
def test_a_dry_run_that_finds_a_bad_batch_says_it_wrote_nothing(tmp_path, monkeypatch, overrides, match):
    """The dry run's error for the batch the run would stop on ended as the run's, "(nothing was written for this shard)",
    where a dry run writes nothing and has no shard."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TargetError, match=rf"^{match}.*\(kdcache extract would stop at this first batch; the dry run wrote nothing\)$"):
        kdcache.dry_run(make_pipeline(*overrides, "extract.batch_size=32"))
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------- precision and compression


@pytest.mark.parametrize("precision, rtol", [("bf16", 2e-2), ("fp16", 5e-3)])
def test_autocast_precision_stays_close_to_fp32(tmp_path, precision, rtol):
    _, arrays = extract(tmp_path, f"extract.precision={precision}", "targets.dtype=float32")
    _, reference = extract(tmp_path, "targets.dtype=float32", name="fp32.zarr")
    for path in ("targets/layers/conv", "targets/layers/fc"):
        assert arrays[path].dtype == np.float32
        np.testing.assert_allclose(arrays[path], reference[path], rtol=rtol, atol=rtol)
    np.testing.assert_array_equal(arrays["targets/logits"][:, 0], np.arange(50, dtype=np.float32))


def test_uncompressed_store_holds_the_same_values(tmp_path):
    manifest, arrays = extract(tmp_path, "extract.compression=none")
    _, reference = extract(tmp_path, name="zstd.zarr")
    assert manifest["compression"]["codec"] == "none"
    assert arrays.keys() == reference.keys()
    for path in reference:
        np.testing.assert_array_equal(arrays[path], reference[path], err_msg=path)


@pytest.mark.parametrize("factory", ["squeezing", "fixed_batch"])
def test_the_one_sample_probe_lets_models_be_that_never_see_a_batch_of_one(tmp_path, factory):
    """The probe that shows a sequence-first layer runs one sample through the teacher. A model that cannot take a
    batch of one (it raises) or drops the batch axis of one (a squeeze) is not refused for it: 40 samples in 16-row
    shards with batches of 8 never make a batch of one, and every batch the run makes is checked."""
    from conftest import TINY_TOML

    out = tmp_path / f"{factory}.zarr"
    values = [f'teacher.factory="bad_input.py:{factory}"', 'data.factory="numbered.py:tiny_short"', "targets.layers=[]"]
    info = kdcache.extract(kdcache.load_pipeline(TINY_TOML, values), str(out))
    assert info["complete"] and kdcache.open_store(out).read("targets/logits", 0, 40).shape == (40, 4)
