"""``student.inputs``: the keys of the dataset's dict items the student is called with (README, Pipeline files), against
real stores of a seeded per-token teacher (extract_zoo.TokenLM) over dict items holding an entry the student does not take
(``token_type_ids``)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import kdcache
from conftest import FIXTURES, TINY_TOML
from reference import train_cut_after_first_epoch
from kdcache import cli
from kdcache.errors import AlignmentError, ModelError, PipelineError
from kdcache.pipeline import from_dict
from kdcache.train import train

TAKES = ["tokens", "attention_mask"]  # what extract_zoo.TokenBag's forward takes


def token_pipeline(dataset: str = "typed_tokens", student: str = "token_bag_student", inputs: list[str] | None = None,
                   **train_values) -> kdcache.Pipeline:
    """extract_zoo.TokenLM's (6, 12) per-token logits over ``dataset``'s dict items, distilled by kl into ``student``."""
    values = {"epochs": 2, "batch_size": 8, "lr": 0.01, "device": "cpu", **train_values}
    return from_dict({"teacher": {"factory": "extract_zoo.py:token_lm"}, "data": {"factory": f"extract_zoo.py:{dataset}"},
                      "targets": {"dtype": "float32"}, "extract": {"batch_size": 10, "device": "cpu", "rows_per_shard": 10},
                      "student": {"factory": f"extract_zoo.py:{student}", **({"inputs": inputs} if inputs is not None else {})},
                      "train": values}, root=FIXTURES)


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, str]:
    """TokenLM over 50 items with token_type_ids ("typed") and over the same items without ("padded"): TokenLM passes
    token_type_ids over, so both store the same logits."""
    folder = tmp_path_factory.mktemp("input-stores")
    out = {name: str(folder / f"{name}.zarr") for name in ("typed", "padded")}
    kdcache.extract(token_pipeline("typed_tokens"), out["typed"])
    kdcache.extract(token_pipeline("padded_tokens"), out["padded"])
    return out


def weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "student.pt")


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_student_called_with_the_entries_student_inputs_names_trains_as_on_items_holding_only_those(stores, tmp_path):
    """A student without token_type_ids in its forward failed on items holding it (and still does without student.inputs,
    in one line naming the setting); with student.inputs it trains, to the weights of the same student on the items
    without that entry (TokenLM stored the same logits for both), alone and with train.streams = 2; pipeline.json records
    the setting."""
    with pytest.raises(ModelError, match=r"^the student model raised TypeError: .*unexpected keyword argument 'token_type_ids'.*"
                                         r"set student.inputs to the keys it takes") as e:
        train(token_pipeline(), stores["typed"], tmp_path / "all")
    assert "\n" not in str(e.value)
    for streams in (1, 2):
        typed, padded = tmp_path / f"typed-{streams}", tmp_path / f"padded-{streams}"
        train(token_pipeline(inputs=TAKES, streams=streams), stores["typed"], typed)
        train(token_pipeline("padded_tokens", streams=streams), stores["padded"], padded)
        assert same(weights(typed), weights(padded)), streams
        assert json.loads((typed / "pipeline.json").read_text())["student"]["inputs"] == TAKES


def test_train_mask_is_read_from_the_whole_item_not_from_the_student_s_inputs(stores, tmp_path):
    """student.inputs = ["tokens"] with train.mask = "attention_mask": the student is called with its tokens alone, and
    the mask still leaves the padding out of kl (the same weights as TokenBag, whose forward ignores the mask it is
    given; other weights than without train.mask)."""
    runs = {}
    for student, inputs, mask in (("tokens_only_student", ["tokens"], "attention_mask"), ("token_bag_student", TAKES, "attention_mask"),
                                  ("tokens_only_student", ["tokens"], "")):
        out = tmp_path / f"{student}-{mask or 'none'}"
        train(token_pipeline(student=student, inputs=inputs, mask=mask), stores["typed"], out)
        runs[student, mask] = weights(out)
    assert same(runs["tokens_only_student", "attention_mask"], runs["token_bag_student", "attention_mask"])
    assert not same(runs["tokens_only_student", "attention_mask"], runs["tokens_only_student", ""])


@pytest.mark.parametrize(("inputs", "message"), [
    (["tokens", "token_type"], r"^<dict>: student.inputs names 'token_type', which the dataset's items do not have \(their "
                               r"entries: 'tokens', 'attention_mask', 'token_type_ids'\); list some of those, or set "
                               r"student.inputs = \[\] for all$"),
    (["label"], r"^<dict>: student.inputs names 'label' \(the items' label, which no model is given\), which the dataset's"),
])
def test_a_key_the_items_do_not_have_is_refused_before_the_student_is_built(stores, tmp_path, inputs, message, monkeypatch):
    built = []
    monkeypatch.setattr("extract_zoo.TokenBag.__init__", lambda *a, **k: built.append(1) or None)
    with pytest.raises(PipelineError, match=message):
        train(token_pipeline(inputs=inputs), stores["typed"], tmp_path / "run")
    assert built == [] and not (tmp_path / "run").exists()


def test_student_inputs_on_items_that_are_not_dicts_is_refused(tiny_store, tmp_path):
    p = kdcache.load_pipeline(TINY_TOML, ["train.features={}", "train.eval_split=''", 'student.inputs=["x"]'])
    with pytest.raises(PipelineError, match=r"^override 'student.inputs=\[\"x\"\]': student.inputs = \['x'\] applies to dict items only, "
                                           r"but the dataset's items' inputs are float32\[.*\], which the student is given whole; "
                                           r"set student.inputs = \[\] \(the default\)$"):
        train(p, tiny_store, tmp_path / "run")


def test_a_key_listed_twice_is_refused():
    with pytest.raises(PipelineError, match=r"^<dict>: student.inputs lists 'tokens' twice; list each key once$"):
        token_pipeline(inputs=["tokens", "attention_mask", "tokens"])


def test_a_resume_with_other_student_inputs_is_refused_and_with_the_same_continues(stores, tmp_path):
    out = tmp_path / "run"
    train_cut_after_first_epoch(token_pipeline(inputs=TAKES), stores["typed"], out)
    with pytest.raises(PipelineError, match=re.escape(f"resume=True: student.inputs was ['tokens', 'attention_mask'] in this run "
                                                      f"({str(out / 'pipeline.json')!r}), now []; resume with the run's values")):
        train(token_pipeline(), stores["typed"], out, resume=True)
    with pytest.raises(PipelineError, match=re.escape("student.inputs was ['tokens', 'attention_mask'] in this run")):
        train(token_pipeline(inputs=["tokens"]), stores["typed"], out, resume=True)  # a key dropped: another call
    # the same keyword arguments listed in another order: the same call (was refused as a change)
    train(token_pipeline(inputs=TAKES[::-1]), stores["typed"], out, resume=True)
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1]


def test_the_dry_run_shows_the_inputs_each_model_is_called_with_and_warns_of_a_key_the_items_lack(tmp_path):
    report = kdcache.dry_run(token_pipeline(inputs=["tokens"]))
    assert report["inputs"] == {"teacher": ["tokens", "attention_mask", "token_type_ids"], "student": ["tokens"]}
    assert report["warnings"] == []
    report = kdcache.dry_run(token_pipeline(inputs=["tokens", "segments"]))
    assert [w for w in report["warnings"] if "student.inputs" in w] == [
        "kdcache train would refuse this store: <dict>: student.inputs names 'segments', which the dataset's items do not have "
        "(their entries: 'tokens', 'attention_mask', 'token_type_ids'); list some of those, or set student.inputs = [] for all"]
    toml = tmp_path / "p.toml"
    for inputs, said in ((["tokens"], "student (student.inputs): tokens"), ([], "student: the same"),
                         (["tokens", "segments"], "student: refused (see the warning)")):
        toml.write_text(f'[teacher]\nfactory = "{FIXTURES}/extract_zoo.py:token_lm"\n[data]\nfactory = "{FIXTURES}/extract_zoo.py:typed_tokens"\n'
                        f'[extract]\ndevice = "cpu"\n[student]\ninputs = {json.dumps(inputs)}\n')
        result = CliRunner().invoke(cli.main, ["extract", str(toml), "--dry-run"])
        assert result.exit_code == 0, result.output
        assert f"inputs      teacher: tokens, attention_mask, token_type_ids; {said}\n" in result.output


@pytest.mark.parametrize("workers", [0, 2])
def test_an_entry_the_student_is_not_given_that_changed_since_extraction_is_refused(stores, tmp_path, workers):
    """The fingerprints that pair the stored rows with the items are of the whole item, as the teacher was given it: an
    entry student.inputs leaves out (token_type_ids) that changed since extraction is a changed input, named by its row.
    Found in a DataLoader worker, the error kdcache.train raises has the worker's own message, not torch's text around it."""
    with pytest.raises(AlignmentError, match=r"^store row 30 \(dataset index 30\) of .* has input fingerprint "
                                                         r"[0-9a-f]{16} but the dataset now gives [0-9a-f]{16}: the dataset changed") as e:
        train(token_pipeline("retyped_tokens", inputs=TAKES, epochs=1, num_workers=workers), stores["typed"], tmp_path / "run")
    assert "\n" not in str(e.value)
