"""Damaged stores, in the matrix's form (see test_bad_input): zarr metadata that is valid JSON but not an
object, damaged group or array metadata, a damaged done marker, a manifest header of the wrong type, things
that are not stores (an HDF5 file, a zarr v2 group, a missing zip), layer names that differ only in case, and
pack of a store missing a done shard's object.

Also: ``create_or_resume(..., overwrite=True)`` deletes nothing of the old store when the new one cannot be
created, and pack reads a store named by a relative path whole.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path
from typing import Any, Callable

import pytest
from click.testing import CliRunner

from conftest import served_folder
from kdcache.cli import main
from kdcache.errors import StoreError
from kdcache.store import DONE, LOGITS, create_or_resume, open_store
from kdcache.verify import verify
from test_bad_input import (LOGITS_SHARD_1, TINY, TRAIN, Case, Ctx, check_output, edit_manifest, extract, factory_file, flip_byte, invoke,
                             snapshot, text_file, train, truncate)

OUT = "out"  # export / pack write out.h5 / out.zarr.zip in the case's folder: a failed one leaves nothing named out*


def write(key: str, text: str | bytes) -> Callable[[Path], None]:
    """Damage: replace the object ``key`` of a store with ``text``."""
    return lambda store: (store / key).write_bytes(text if isinstance(text, bytes) else text.encode())


def edit_metadata(path: str, **fields: Any) -> Callable[[Path], None]:
    """Damage: set ``fields`` of the zarr metadata of the array at ``path``."""

    def damage(store: Path) -> None:
        meta = json.loads((store / path / "zarr.json").read_text())
        (store / path / "zarr.json").write_text(json.dumps(meta | fields))

    return damage


def array_shards(path: str, rows: int) -> Callable[[Path], None]:
    """Damage: the array at ``path`` declares shards (and inner chunks) of ``rows`` rows; the manifest is left as it was."""

    def damage(store: Path) -> None:
        meta = json.loads((store / path / "zarr.json").read_text())
        meta["chunk_grid"]["configuration"]["chunk_shape"][0] = meta["codecs"][0]["configuration"]["chunk_shape"][0] = rows
        (store / path / "zarr.json").write_text(json.dumps(meta))

    return damage


def inner_chunk(store: Path, path: str, rows: int) -> None:
    """Damage: the array at ``path`` declares inner chunks of ``rows`` rows."""
    meta = json.loads((store / path / "zarr.json").read_text())
    meta["codecs"][0]["configuration"]["chunk_shape"][0] = rows
    (store / path / "zarr.json").write_text(json.dumps(meta))


def big_endian(store: Path, path: str, index: bool) -> None:
    """Damage: the array at ``path`` declares its inner chunks' (``index``: its shard index's) bytes big-endian."""
    meta = json.loads((store / path / "zarr.json").read_text())
    meta["codecs"][0]["configuration"]["index_codecs" if index else "codecs"][0]["configuration"]["endian"] = "big"
    (store / path / "zarr.json").write_text(json.dumps(meta))


def key_encoding(path: str, encoding: dict[str, Any], digests: bool = True) -> Callable[[Path], None]:
    """Damage: the array at ``path`` declares another chunk key encoding than the format's (``default``, ``/``), so zarr
    looks for its chunks under other keys and reads the fill value; ``digests=False``: in a store without
    ``progress/digest`` (one written before kdcache 0.1.1), where nothing else would tell the zeros from the rows."""

    def damage(store: Path) -> None:
        edit_metadata(path, chunk_key_encoding=encoding)(store)
        if not digests:
            shutil.rmtree(store / "progress/digest")
            meta = json.loads((store / "zarr.json").read_text())
            del meta["attributes"]["kdcache"]["compression"]["shard_digests"]
            (store / "zarr.json").write_text(json.dumps(meta))

    return damage


def geometry(rows: int) -> Callable[[Path], None]:
    """Damage: the manifest and every array's zarr.json made to agree on one shard of ``rows`` rows (inner chunks too),
    as a received store's could: every other check of the manifest and of the arrays' layout holds."""

    def damage(store: Path) -> None:
        root = json.loads((store / "zarr.json").read_text())
        g = root["attributes"]["kdcache"]["geometry"]
        g.update(rows_per_shard=rows, num_shards=1, chunk_rows={p: rows for p in g["chunk_rows"]})
        (store / "zarr.json").write_text(json.dumps(root))
        for meta in store.rglob("zarr.json"):
            doc = json.loads(meta.read_text())
            if doc.get("node_type") == "array":
                if meta.parent.parent.name == "progress":
                    doc["shape"][0] = 1
                else:
                    doc["chunk_grid"]["configuration"]["chunk_shape"][0] = doc["codecs"][0]["configuration"]["chunk_shape"][0] = rows
                meta.write_text(json.dumps(doc))

    return damage


# one shard of 2**22 rows: 8 GiB of features.3 ([16, 8, 8] float16), 2080 bytes a row in all; the format's limit is 4 GiB
HUGE_ROWS, HUGE = 2**22, ("has a damaged manifest: geometry.rows_per_shard = 4194304, expected at most 2064888 (2080 bytes per row "
                          "in all the data arrays; a shard holds at most 4 GiB of them decoded, FORMAT.md §3.1)",
                          "re-extract or re-import the store")
HUGE_LOGITS = ("'targets/logits/zarr.json' is not valid zarr metadata (its shards of [1073741824, 4] float16 hold 8 GiB each, more "
               "than the 4 GiB a shard may hold decoded, FORMAT.md §3.1)", "run kdcache verify", "re-extract the store")


ROOT_NOT_OBJECT = ("is not a zarr v3 group", "not a JSON object", "pass a store written by kdcache extract")
LOGITS_META = f"{LOGITS}/zarr.json"
BAD_LOGITS_META = (f"'{LOGITS_META}' is not valid zarr metadata", "run kdcache verify", "re-extract the store")
DOT_KEYS = (f"'{LOGITS_META}' is not valid zarr metadata (its chunk_key_encoding is 'default' with separator '.'; the format's is "
            "'default' with '/'", "read as the fill value", "re-extract the store")
MARKER = f"{DONE}/c/1"
BAD_MARKER = (f"done marker '{MARKER}' (holds b'zz') is not one byte 0 or 1", "run kdcache verify",
              "delete the marker and rerun kdcache extract")


def set_root_attribute(value: Any) -> Callable[[Path], None]:
    """Damage: set the root attribute ``kdcache`` (the manifest) to ``value``."""

    def damage(store: Path) -> None:
        meta = json.loads((store / "zarr.json").read_text())
        meta["attributes"]["kdcache"] = value
        (store / "zarr.json").write_text(json.dumps(meta))

    return damage


def edit_target(name: str, **fields: Any) -> Callable[[Path], None]:
    """Damage: set ``fields`` of the manifest's target ``name`` (a field set to None is removed)."""

    def damage(store: Path) -> None:
        meta = json.loads((store / "zarr.json").read_text())
        target = meta["attributes"]["kdcache"]["targets"][name]
        target.update(fields)
        for key in [k for k, v in fields.items() if v is None]:
            del target[key]
        (store / "zarr.json").write_text(json.dumps(meta))

    return damage


def edit_manifest_key(store: Path, key: str, **fields: Any) -> None:
    """Damage: set ``fields`` of the manifest's object ``key`` (a field set to None is removed)."""
    meta = json.loads((store / "zarr.json").read_text())
    obj = meta["attributes"]["kdcache"][key]
    obj.update(fields)
    for k in [k for k, v in fields.items() if v is None]:
        del obj[k]
    (store / "zarr.json").write_text(json.dumps(meta))


def swap_targets(store: Path) -> None:
    """Damage: the manifest's two target objects exchanged under their keys (``logits`` holds features.3's)."""
    meta = json.loads((store / "zarr.json").read_text())
    t = meta["attributes"]["kdcache"]["targets"]
    t["logits"], t["features.3"] = t["features.3"], t["logits"]
    (store / "zarr.json").write_text(json.dumps(meta))


def group_damaged(key: str, why: str) -> tuple[str, ...]:
    return (f"is damaged: '{key}' is not zarr v3 group metadata ({why}", "re-extract the store")


def zarr_v2_group(c: Ctx) -> Path:
    import zarr

    zarr.open_group(str(c.tmp / "v2.zarr"), mode="w", zarr_format=2).create_array("x", shape=(4,), dtype="int8")
    return c.tmp / "v2.zarr"


def zip_of(c: Ctx, folder: Path) -> Path:
    """``folder``'s files packed at the root of ``c.tmp / "other.zarr.zip"`` (a zip of what is not a kdcache store)."""
    import zipfile

    with zipfile.ZipFile(c.tmp / "other.zarr.zip", "w") as z:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            z.write(path, path.relative_to(folder).as_posix())
    return c.tmp / "other.zarr.zip"


def folder_of_notes(c: Ctx) -> Path:
    (c.tmp / "notes").mkdir()
    text_file(c, "notes/readme.txt", "x")
    return c.tmp / "notes"


CASE_TWINS = """import torch
from torch import nn


class Twins(nn.Module):  # two modules whose names differ only in case
    def __init__(self):
        super().__init__()
        self.Conv, self.conv, self.head = nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1), nn.Linear(2, 4)

    def forward(self, x):
        return self.head(self.conv(self.Conv(x)).mean((2, 3)))


def teacher():
    return Twins()
"""


def index_extent(key: str, nbytes: int) -> Callable[[Path], None]:
    """Damage: the shard object ``key`` (one inner chunk) with its index's extent of that chunk ``nbytes`` long, the index's
    crc32c made again for it (a writer's bug, not a flipped byte: the index still checks)."""
    import google_crc32c
    import numpy as np

    def damage(store: Path) -> None:
        raw = bytearray((store / key).read_bytes())
        index = np.frombuffer(bytes(raw[-20:-4]), dtype="<u8").copy()
        index[1] = nbytes
        raw[-20:] = index.tobytes() + google_crc32c.value(index.tobytes()).to_bytes(4, "little")
        (store / key).write_bytes(bytes(raw))

    return damage


def info(c: Ctx) -> list[Any]:
    return ["info", c.store]


def verify_cli(c: Ctx) -> list[Any]:
    return ["verify", c.store]


def resume(c: Ctx) -> list[Any]:
    return extract("--out", c.store)


def stats(c: Ctx) -> list[Any]:
    return ["stats", c.store]


def export(c: Ctx) -> list[Any]:
    return ["export", c.store, c.tmp / f"{OUT}.h5"]


def pack(c: Ctx) -> list[Any]:
    return ["pack", c.store, c.tmp / f"{OUT}.zarr.zip"]


CASES = [
    # -- the root zarr.json is JSON but not an object
    *[Case(f"info-root-{name}", info, (*ROOT_NOT_OBJECT, f"it holds {text}"), store=True, damage=write("zarr.json", text))
      for name, text in (("list", "[]"), ("string", '"x"'), ("number", "3"), ("null", "null"))],
    Case("verify-root-list", verify_cli, (*ROOT_NOT_OBJECT, "it holds []"), store=True, report=True, damage=write("zarr.json", "[]")),
    Case("extract-resume-root-list", resume, ROOT_NOT_OBJECT, store=True, damage=write("zarr.json", "[]")),
    Case("extract-resume-root-null", resume, ROOT_NOT_OBJECT, store=True, damage=write("zarr.json", "null")),
    # -- a group's zarr.json is damaged (FORMAT.md §3: samples, targets, targets/layers, progress)
    Case("info-group-samples-list", info, group_damaged("samples/zarr.json", "it holds [1], not a JSON object"), store=True,
         damage=write("samples/zarr.json", "[1]")),
    Case("verify-group-samples-list", verify_cli, group_damaged("samples/zarr.json", "it holds [1], not a JSON object"), store=True,
         report=True, damage=write("samples/zarr.json", "[1]")),
    Case("train-group-samples-list", train, group_damaged("samples/zarr.json", "it holds [1], not a JSON object"), store=True,
         damage=write("samples/zarr.json", "[1]")),
    Case("extract-resume-group-progress-not-json", resume, group_damaged("progress/zarr.json", "not JSON"), store=True,
         damage=write("progress/zarr.json", "{bad")),
    Case("info-group-targets-missing", info, group_damaged("targets/zarr.json", "it is missing"), store=True,
         damage=lambda s: (s / "targets/zarr.json").unlink()),
    Case("info-group-layers-an-array", info, group_damaged("targets/layers/zarr.json", "zarr_format 3, node_type 'array'"), store=True,
         damage=write("targets/layers/zarr.json", '{"zarr_format": 3, "node_type": "array"}')),
    Case("pack-group-progress-zarr-v2", pack, group_damaged("progress/zarr.json", "zarr_format 2, node_type 'group'"), store=True,
         damage=write("progress/zarr.json", '{"zarr_format": 2, "node_type": "group"}')),
    # -- the manifest's header is of the wrong type (FORMAT.md §2, §8)
    *[Case(f"info-format-version-{name}", info, ("has a damaged manifest: format_version = " + shown, "expected the integer 1 or 2"),
           store=True, damage=lambda s, v=value: edit_manifest(s, format_version=v))
      for name, value, shown in (("true", True, "True"), ("float", 1.0, "1.0"), ("string", "1", "'1'"), ("missing", None, "None"),
                                  ("string-2", "2", "'2'"))],
    Case("info-completed-a-number", info, ("has a damaged manifest: completed = 123", "an ISO-8601 time string or null"), store=True,
         damage=lambda s: edit_manifest(s, completed=123)),
    Case("verify-dataset-length-not-num-samples", verify_cli, ("has a damaged manifest: dataset.length = 1000000, expected num_samples (50)",
                                                               "re-extract or re-import the store"),
         store=True, report=True, damage=lambda s: edit_manifest_key(s, "dataset", length=10**6)),
    Case("train-completed-a-list", train, ("completed = []",), store=True, damage=lambda s: edit_manifest(s, completed=[])),
    # -- a field every command reads is of the wrong type: one line naming it, the value seen and the fix
    *[Case(f"info-{name}", info, (f"has a damaged manifest: {said}", "re-extract or re-import the store"), store=True, damage=damage)
      for name, damage, said in (
          ("has-labels-null", lambda s: edit_manifest(s, has_labels=None), "has_labels = None, expected true or false"),
          ("teacher-a-string", lambda s: edit_manifest(s, teacher="tiny"), "teacher = 'tiny', expected an object"),
          ("teacher-factory-a-number", lambda s: edit_manifest_key(s, "teacher", factory=1), "teacher.factory = 1, expected a string"),
          ("chunk-rows-a-list", lambda s: edit_manifest_key(s, "geometry", chunk_rows=[]), "geometry.chunk_rows = [], expected an object"),
          ("chunk-rows-0", lambda s: edit_manifest_key(s, "geometry", chunk_rows={"targets/logits": 0}),
           "geometry.chunk_rows.targets/logits = 0, expected an integer in 1..16"),
          ("target-a-list", lambda s: edit_manifest_key(s, "targets", logits=[1]), "targets.logits = [1], expected a target object"),
          ("target-mask-a-number", edit_target("logits", mask=1), "targets.logits.mask = 1, expected a string"))],
    # -- a target object lacks a key every command reads (FORMAT.md §8): once a KeyError traceback
    Case("info-target-select-missing", info, ("has a damaged manifest: targets.logits.select = None, expected a string",
                                              "re-extract or re-import the store"), store=True, damage=edit_target("logits", select=None)),
    Case("verify-target-source-missing", verify_cli, ("has a damaged manifest: targets.features.3.source = None, expected a string",),
         store=True, report=True, damage=edit_target("features.3", source=None)),
    Case("stats-target-select-a-number", stats, ("targets.features.3.select = 0, expected a string",), store=True,
         damage=edit_target("features.3", select=0)),
    # -- a manifest key that every command, or training, reads: of the wrong type, once an AttributeError/KeyError traceback
    Case("info-compression-a-string", info, ("has a damaged manifest: compression = 'zstd', expected an object",
                                             "re-extract or re-import the store"), store=True,
         damage=lambda s: edit_manifest(s, compression="zstd")),
    Case("verify-compression-a-list", verify_cli, ("has a damaged manifest: compression = [1], expected an object",), store=True,
         report=True, damage=lambda s: edit_manifest(s, compression=[1])),
    Case("verify-precision-a-list", verify_cli, ("has a damaged manifest: precision = ['fp32']",), store=True, report=True,
         damage=lambda s: edit_manifest(s, precision=["fp32"])),
    *[Case(f"train-probe-fingerprints-{name}", train, (f"has a damaged manifest: dataset.probe_fingerprints{key} = {shown}",
                                                       "re-extract or re-import the store"), store=True,
           damage=lambda s, v=value: edit_manifest_key(s, "dataset", probe_fingerprints=v))
      for name, value, key, shown in (("missing", None, "", "None"), ("a-list", [1, 2], "", "[1, 2]"),
                                      ("a-number", {"0": 12}, ".0", "12"), ("past-the-end", {"50": "0" * 16}, ".50", "'" + "0" * 16 + "'"))],
    Case("info-target-name-not-its-key", info, ("has a damaged manifest: targets.logits.name = 'features.3', expected 'logits'",),
         store=True, damage=swap_targets),
    Case("info-format-other", info, ("not a kdcache store (its 'kdcache' root attribute has format 'other', not 'kdcache-store')",),
         store=True, damage=lambda s: edit_manifest(s, format="other")),
    Case("info-manifest-not-an-object", info, ("not a kdcache store (its 'kdcache' root attribute holds [1], not a JSON object)",),
         store=True, damage=set_root_attribute([1])),
    # -- things that are not stores: the message says what they are and the fix that fits
    Case("info-hdf5-file", lambda c: ["info", text_file(c, "t.h5", b"\x89HDF\r\n\x1a\n" + bytes(64))],
         ("t.h5' is an HDF5 file", "run kdcache import", "STORE first")),
    Case("info-zarr-v2-group", lambda c: ["info", zarr_v2_group(c)], ("v2.zarr' is a zarr v2 group", "not a kdcache store (zarr v3)")),
    Case("info-zip-missing", lambda c: ["info", c.tmp / "none.zarr.zip"], ("none.zarr.zip' (no such file)", "kdcache pack STORE")),
    Case("info-plain-file", lambda c: ["info", text_file(c, "notes.txt", "x")], ("notes.txt' is a file, not a store",)),
    Case("info-folder-of-other-files", lambda c: ["info", folder_of_notes(c)],
         ("/notes': the folder holds no zarr.json; pass the folder of a store (kdcache extract PIPELINE --out NEW writes one)",)),
    # a copy cut short that lacks only the root zarr.json (rsync copies it last): once "the folder holds no zarr.json; pass
    # the folder of a store (kdcache extract PIPELINE --out NEW writes one)", which told a user to extract it again
    *[Case(f"{verb}-a-copy-without-its-root-zarr-json", args,
           ("': the folder holds a kdcache store's arrays but not its root zarr.json", "an incomplete copy",
            "copy the store again whole"), store=True, damage=lambda s: (s / "zarr.json").unlink())
      for verb, args in (("info", info), ("verify", verify_cli), ("pack", pack),
                         ("train", lambda c: ["train", TINY, "--cache", c.store, "--out", c.tmp / "next"]))],
    Case("info-zip-of-other-files", lambda c: ["info", zip_of(c, folder_of_notes(c))],
         ("other.zarr.zip': the zip holds no zarr.json at its root; pass a .zarr.zip written by kdcache pack",)),
    Case("info-zip-of-a-zarr-v2-group", lambda c: ["info", zip_of(c, zarr_v2_group(c))],
         ("other.zarr.zip' is a zarr v2 group", "not a kdcache store (zarr v3)")),
    Case("info-zip-that-is-no-zip", lambda c: ["info", text_file(c, "t.zarr.zip", "notes")],
         ("t.zarr.zip' is not a readable zip file (File is not a zip file); pass a .zarr.zip written by kdcache pack",)),
    # once "a zip file not named .zip; pass it as zip::PATH/", which read no store either
    Case("info-zip-named-as-a-folder", lambda c: ["info", f"{text_file(c, 't.zarr.zip', 'PK')}/"],
         ("t.zarr.zip/' is a file, named with a trailing '/'; pass '", "t.zarr.zip'")),
    Case("info-torch-checkpoint", lambda c: ["info", torch_checkpoint(c)],
         ("student.pt' is a zip file that holds no store (no zarr.json at its root: a PyTorch checkpoint", "a .zarr.zip written by kdcache pack")),
    Case("train-cache-a-training-run", lambda c: ["train", TINY, "--cache", training_run(c), "--out", c.tmp / "next"],
         ("/run': it is a training run's folder (kdcache train --out: student.pt, pipeline.json)",
          "pass the store kdcache extract wrote (train --cache takes it)")),
    # a part of a store (what an unpacked hand-over shows first): once "a zarr group but not a kdcache store", "not a zarr v3
    # group (ContainsArrayError ...)", "the folder holds no zarr.json" or "a file, not a store", none naming the store
    *[Case(f"{verb}-a-part-of-a-store-{part.replace('/', '-')}", lambda c, a=args, p=part: a(c, c.store / p),
           (f"is '{part}' inside the store '", f"{TRAIN}', not a store itself; pass '"), store=True)
      for verb, args, part in (("info", lambda c, s: ["info", s], "targets"), ("verify", lambda c, s: ["verify", s], "targets/logits"),
                               ("pack", lambda c, s: ["pack", s, c.tmp / f"{OUT}.zarr.zip"], "samples/index/c"),
                               ("train", lambda c, s: ["train", TINY, "--cache", s, "--out", c.tmp / "next"], "zarr.json"))],
    # -- a new store whose layer names differ only in case (FORMAT.md §6)
    Case("extract-layers-differ-in-case", lambda c: extract("--out", c.new, "--set", factory_file(c, "twins.py", CASE_TWINS),
                                                            "--set", 'targets.layers=["Conv", "conv"]'),
         ("layer names 'Conv' and 'conv' differ only in case", "hook a parent module")),
    # -- an array's zarr.json is damaged
    *[Case(f"{verb}-array-meta-not-json", args, (*BAD_LOGITS_META, "Expecting property name"), store=True,
           damage=write(LOGITS_META, "{bad"))
      for verb, args in (("info", info), ("train", train), ("stats", stats), ("export", export), ("pack", pack), ("extract-resume", resume))],
    # once "... is not valid zarr metadata: '…' is damaged: '…' is not valid zarr metadata (…); run kdcache verify …", from inside verify
    Case("verify-array-meta-not-json", verify_cli, (f"targets/logits: '{LOGITS_META}' is not valid zarr metadata (Expecting property name",
                                                    "char 1)); re-extract the store\n"), store=True, report=True,
         damage=write(LOGITS_META, "{bad")),
    Case("info-array-meta-list", info, (*BAD_LOGITS_META, "it holds [], not a JSON object"), store=True, damage=write(LOGITS_META, "[]")),
    Case("train-array-meta-list", train, BAD_LOGITS_META, store=True, damage=write(LOGITS_META, "[]")),
    Case("info-array-meta-a-group", info, (*BAD_LOGITS_META, "it describes a group, not an array"), store=True,
         damage=write(LOGITS_META, '{"zarr_format": 3, "node_type": "group"}')),
    *[Case(f"{verb}-array-meta-inner-chunk-of-0-rows", args, (*BAD_LOGITS_META, "ZeroDivisionError"), store=True,
           damage=lambda s: inner_chunk(s, LOGITS, 0))  # once a ZeroDivisionError traceback from zarr's sharding codec
      for verb, args in (("info", info), ("train", train))],
    Case("verify-array-meta-inner-chunk-of-0-rows", verify_cli, (f"'{LOGITS_META}' is not valid zarr metadata", "ZeroDivisionError"),
         store=True, report=True, damage=lambda s: inner_chunk(s, LOGITS, 0)),
    # big-endian bytes: kdcache's whole-shard reader took the bytes as little-endian and zarr (a part of a shard: verify
    # --teacher-check, a zip) as big-endian, so verify passed a store whose rows read two ways
    *[Case(f"{verb}-array-meta-big-endian{part}", args, (f"'{LOGITS_META}' is not valid zarr metadata (its bytes codec is big-endian; "
                                                         "the format's is little-endian)",), store=True, report=verb == "verify",
           damage=lambda s, i=index: big_endian(s, LOGITS, i))
      for verb, args in (("verify", verify_cli), ("train", train)) for part, index in (("", False), ("-index", True))],
    Case("info-array-meta-bad-codecs", info, (*BAD_LOGITS_META, "TypeError"), store=True, damage=edit_metadata(LOGITS, codecs=7)),
    Case("train-array-meta-wrong-rows", train, (*BAD_LOGITS_META, "it says [40, 4] float16, the manifest says [50, 4] float16"),
         store=True, damage=edit_metadata(LOGITS, shape=[40, 4])),
    # a per-sample shape of 2**62: once named as streaming buffers too large for memory ("lower train.shuffle_buffer_shards")
    Case("train-array-meta-huge-sample-shape", train, (*BAD_LOGITS_META, f"it says [50, {2**62}] float16, the manifest says [50, 4] float16"),
         store=True, damage=edit_metadata(LOGITS, shape=[50, 2**62])),
    Case("info-array-meta-huge-sample-shape", info, (*BAD_LOGITS_META, f"it says [50, {2**62}] float16, the manifest says [50, 4] float16"),
         store=True, damage=edit_metadata(LOGITS, shape=[50, 2**62])),  # was exit 0, with bytes_raw counted from it
    Case("export-array-meta-wrong-shape", export, (*BAD_LOGITS_META, "it says [50, 3] float16, the manifest says [50, 4] float16"),
         store=True, damage=edit_metadata(LOGITS, shape=[50, 3])),
    Case("stats-array-meta-wrong-dtype", stats, (*BAD_LOGITS_META, "it says [50, 4] float32, the manifest says [50, 4] float16"),
         store=True, damage=edit_metadata(LOGITS, data_type="float32")),
    Case("pack-array-meta-wrong-shape", pack, (*BAD_LOGITS_META, "it says [50, 3] float16"), store=True,
         damage=edit_metadata(LOGITS, shape=[50, 3])),
    # -- another chunk key encoding: every chunk read as the fill value; without digests train and verify took the zeros
    *[Case(f"{verb}-array-meta-key-encoding-dot{'' if digests else '-no-digests'}", args, DOT_KEYS[:1] if verb == "verify" else DOT_KEYS,
           store=True, report=verb == "verify",
           damage=key_encoding(LOGITS, {"name": "default", "configuration": {"separator": "."}}, digests))
      for verb, args in (("verify", verify_cli), ("train", train)) for digests in (True, False)],
    Case("stats-array-meta-key-encoding-v2", stats, (f"'{LOGITS_META}' is not valid zarr metadata (its chunk_key_encoding is 'v2'",),
         store=True, damage=key_encoding(LOGITS, {"name": "v2", "configuration": {"separator": "/"}}, digests=False)),
    Case("info-done-meta-key-encoding-dot", info, (f"'{DONE}/zarr.json' is not valid zarr metadata (its chunk_key_encoding is 'default' "
                                                   "with separator '.'",), store=True,
         damage=edit_metadata(DONE, chunk_key_encoding={"name": "default", "configuration": {"separator": "."}})),
    # -- shards larger than the format allows, in a manifest made to agree with the arrays, or in an array's zarr.json alone
    *[Case(f"{verb}-geometry-shards-too-large", args, HUGE, store=True, report=verb == "verify", damage=geometry(HUGE_ROWS))
      for verb, args in (("info", info), ("train", train), ("verify", verify_cli))],
    *[Case(f"{verb}-array-meta-shards-too-large", args, HUGE_LOGITS, store=True, damage=array_shards(LOGITS, 2**30))
      for verb, args in (("train", train), ("export", export))],
    # -- progress/digest's metadata of another shape, or of a codec its uncompressed rows do not decode with; a shard index
    # whose extent runs past its object
    Case("verify-digest-meta-wrong-shape", verify_cli, ("progress/digest: 'progress/digest/zarr.json' is not valid zarr metadata "
                                                        "(it says [4, 9] uint32, expected [4, 5] uint32); re-extract the store",),
         store=True, report=True, damage=edit_metadata("progress/digest", shape=[4, 9])),
    Case("verify-digest-does-not-decode", verify_cli, ("progress/digest: ", "is damaged: progress/digest does not decode (RuntimeError: "
                                                       "'Zstd decompression error", "re-extract the store"), store=True, report=True,
         damage=edit_metadata("progress/digest", codecs=[{"name": "bytes", "configuration": {"endian": "little"}},
                                                         {"name": "zstd", "configuration": {"level": 1, "checksum": False}}])),
    Case("verify-shard-index-extent-outside-the-object", verify_cli,
         ("targets/logits: shard 1 inner chunk 0 (rows 16..): extent 0+100000 outside the object",), store=True, report=True,
         damage=index_extent(LOGITS_SHARD_1, 100_000)),
    # -- a done marker is damaged
    *[Case(f"{verb}-damaged-done-marker", args, BAD_MARKER, store=True, report=verb == "verify", damage=write(MARKER, "zz"))
      for verb, args in (("info", info), ("train", train), ("stats", stats), ("export", export), ("pack", pack),
                         ("extract-resume", resume))],
    # once verify's "open" problem, the store's error itself (which says to run kdcache verify): verify stopped there
    Case("verify-damaged-done-marker", verify_cli, (f"done marker '{MARKER}' (holds b'zz') is not one byte 0 or 1 (its shard is not "
                                                    "checked); delete the marker", "ok    checksums     3 shards"),
         store=True, report=True, damage=write(MARKER, "zz")),
    Case("info-done-marker-not-a-bool", info, ("done marker 'progress/done/c/2' (holds b'z') is not one byte 0 or 1",), store=True,
         damage=write(f"{DONE}/c/2", "z")),
    # a marker chunk of 2**32 flags: once "done marker (unreadable) is not one byte 0 or 1", whose fix (delete it) could not help
    Case("info-done-meta-huge-chunk", info, (f"'{DONE}/zarr.json' is not valid zarr metadata", "it says [4] bool in chunks of "
                                             f"[{2**32}], expected [4] bool in chunks of [1]"), store=True,
         damage=edit_metadata(DONE, chunk_grid={"name": "regular", "configuration": {"chunk_shape": [2**32]}})),
    Case("info-done-meta-wrong-shape", info, (f"'{DONE}/zarr.json' is not valid zarr metadata", "it says [5] bool, expected [4] bool"),
         store=True, damage=edit_metadata(DONE, shape=[5])),
    # -- pack of a store a done shard's object is missing from
    Case("pack-missing-shard-object", pack,
         ("cannot pack", f"shard 1 of targets/logits (rows 16-31): object '{LOGITS_SHARD_1}' is missing although the shard is marked done",
          "run kdcache verify", "re-extract the store"), store=True, damage=lambda s: (s / LOGITS_SHARD_1).unlink()),
    Case("pack-empty-shard-object", pack, (f"object '{LOGITS_SHARD_1}' is empty although the shard is marked done",), store=True,
         damage=lambda s: truncate(s, LOGITS_SHARD_1, 0)),
    Case("pack-missing-digest-object", pack, ("cannot pack", "shard 1 (rows 16-31) has no digest: object 'progress/digest/c/1/0' is "
                                              "missing or all 0 although the shard is marked done", "run kdcache verify"),
         store=True, damage=lambda s: (s / "progress/digest/c/1/0").unlink()),
]


@pytest.mark.parametrize("member", ["targets", "targets/logits/c/0/0", "zarr.json"])
def test_a_path_inside_a_packed_store_names_the_zip(tiny_store, tmp_path, member):
    """A member's path under a store's zip (what ``unzip -l`` lists) was 'no store at …; run kdcache extract PIPELINE
    --out t.zarr.zip/targets first', which cannot write there; it is named as that part of the zip, which the error says to pass."""
    packed = tmp_path / "t.zarr.zip"
    assert CliRunner().invoke(main, ["pack", tiny_store, str(packed)]).exit_code == 0
    result = CliRunner().invoke(main, ["info", f"{packed}/{member}"])
    assert result.exit_code == 1 and result.stderr == (f"Error: '{packed}/{member}' is '{member}' inside the store '{packed}' (a zip), "
                                                       f"not a store itself; pass '{packed}'\n"), result.output


@pytest.mark.parametrize("command", [["extract", str(TINY), "--out"], ["info"], ["import", "t.h5"], ["train", str(TINY), "--out", "run", "--cache"]])
@pytest.mark.parametrize("url", ["s3:/bucket/t.zarr", "zip::https:/host/t.zarr.zip"])
def test_a_url_that_lost_a_slash_is_named_and_nothing_is_written(command: list[Any], url: str, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """``s3:/bucket/t.zarr`` (``pathlib.Path("s3://bucket/t.zarr")`` gives it) was a local path: extract wrote a folder
    ``s3:`` in the working directory and every reader said "no store ...; run kdcache extract ... first"."""
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, [*command, url])
    fixed = url.replace(":/", "://", 2 if url.startswith("zip") else 1).replace("zip:://", "zip::")
    assert r.exit_code == 1 and r.output == (f"Error: {url!r} is a local path under a folder '{url.split(':/')[0].split('::')[-1]}:', "
                                             "not a URL: a URL has two slashes after its scheme (pathlib.Path and os.path.normpath "
                                             f"merge them into one); pass {fixed!r}\n"), r.output
    assert list(tmp_path.iterdir()) == []


def test_a_zip_path_that_lost_a_colon_is_named_with_the_location_that_reads_it(tiny_store, tmp_path):
    """``zip:/PATH`` was told to pass ``zip://PATH``, which fsspec reads as a member of a zip chained to nothing ("cannot
    reach 'zip://…': Is a directory"); the location that reads the zip is kdcache's ``zip::PATH``."""
    packed = tmp_path / "t.zarr.zip"
    assert CliRunner().invoke(main, ["pack", tiny_store, str(packed)]).exit_code == 0
    r = CliRunner().invoke(main, ["info", f"zip:{packed}"])
    assert r.exit_code == 1 and r.output.endswith(f"; pass 'zip::{packed}'\n"), r.output
    assert CliRunner().invoke(main, ["info", f"zip::{packed}"]).exit_code == 0


@pytest.mark.parametrize("command", [["info"], ["verify"], ["extract", str(TINY), "--out"], ["import", "t.h5"]])
def test_a_zip_url_without_a_chain_is_named_with_the_location_that_reads_it(command: list[Any], tiny_store, tmp_path, monkeypatch):
    """``zip://t.zarr.zip``, a URL's spelling of ``zip::t.zarr.zip``, is fsspec's member of a zip chained to nothing: it
    opened the working folder as the zip, ``info`` said "cannot reach 'zip://t.zarr.zip': [Errno 21] Is a directory:
    '…'", and ``extract --out zip://…`` ended in that IsADirectoryError's traceback. It is named, with the location that
    reads the zip, and nothing is written."""
    assert CliRunner().invoke(main, ["pack", tiny_store, str(tmp_path / "t.zarr.zip")]).exit_code == 0
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, [*command, "zip://t.zarr.zip"])
    assert r.exit_code == 1 and r.output == ("Error: 'zip://t.zarr.zip': fsspec's zip:// names a member of a zip chained after "
                                             "'::' (zip://MEMBER::FILE), and none is; a zip store is read as 'zip::t.zarr.zip', or "
                                             "by its path alone where it ends in .zip\n"), r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.zarr.zip"]
    assert CliRunner().invoke(main, ["info", "zip::t.zarr.zip"]).exit_code == 0


def torch_checkpoint(ctx: Ctx) -> Path:
    """A state dict saved by torch.save (a zip file, of another name than .zip)."""
    import torch

    torch.save({"w": torch.zeros(2)}, ctx.tmp / "student.pt")
    return ctx.tmp / "student.pt"


def training_run(ctx: Ctx) -> Path:
    """A folder as kdcache train --out leaves it (its files' names are what tell it)."""
    run = ctx.tmp / "run"
    run.mkdir()
    for name in ("student.pt", "heads.pt", "metrics.jsonl", "pipeline.json", "checkpoint.pt"):
        (run / name).write_bytes(b"")
    return run


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_store(case: Case, tmp_path: Path, tiny_store: str) -> None:
    run, result = invoke(case, tmp_path, tiny_store)
    check_output(case, result.exit_code, result.stdout, result.stderr)
    run.check_untouched()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(OUT)], "a failed export/pack left a file"


def test_cases_are_unique() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))


def test_deleting_a_damaged_done_marker_lets_extract_redo_its_shard(tmp_path: Path, tiny_store: str) -> None:
    """The fix the damaged-marker error names works: delete the marker, rerun extract, the store verifies."""
    store = tmp_path / TRAIN
    shutil.copytree(tiny_store, store)
    write(MARKER, "zz")(store)
    (store / MARKER).unlink()
    result = CliRunner().invoke(main, [str(a) for a in extract("--out", store)])
    assert result.exit_code == 0, result.output
    assert verify(str(store))["ok"]


@pytest.mark.parametrize("lost", [LOGITS_SHARD_1, "progress/digest/c/1/0"], ids=["shard-object", "digest-row"])
def test_the_fix_a_damaged_shards_error_names_lets_extract_redo_it(tmp_path: Path, tiny_store: str, lost: str) -> None:
    """A done shard that lost an object (an incomplete copy): extract took the store as complete ("nothing to do
    (--overwrite to redo it)") and the error said "re-extract the store", i.e. redo every shard to mend one. It now says
    that a rerun of extract redoes it (it named the done marker to delete, a step extract takes itself since); extract then
    redoes that shard alone and the store verifies. Bytes there but wrong still name the marker to delete. (train finds
    the lost object before its run begins, listing the objects of the shards it reads.)"""
    store = tmp_path / TRAIN
    shutil.copytree(tiny_store, store)
    (store / lost).unlink()
    damaged = CliRunner().invoke(main, ["train", str(extract()[1]), "--cache", str(store), "--out", str(tmp_path / "run"), "--epochs", "1"])
    assert damaged.exit_code == 1 and f"run kdcache extract PIPELINE --out {store}, which resumes it and rewrites those shards" \
        in damaged.output and "done marker" not in damaged.output, damaged.output
    result = CliRunner().invoke(main, [str(a) for a in extract("--out", store)])
    assert result.exit_code == 0, result.output
    assert "3 of 4 shards were already done" in result.output and verify(str(store))["ok"], result.output


def test_a_done_shard_with_wrong_bytes_names_its_done_marker_to_delete(tmp_path: Path, tiny_store: str) -> None:
    """Bytes that are there but wrong (a flipped bit: a checksum mismatch) are taken as done by extract, which redoes
    only a shard whose objects are missing or empty: the error names the done marker to delete, and that fix works."""
    store = tmp_path / TRAIN
    shutil.copytree(tiny_store, store)
    data = bytearray((store / LOGITS_SHARD_1).read_bytes())
    data[len(data) // 3] ^= 0x40
    (store / LOGITS_SHARD_1).write_bytes(bytes(data))
    damaged = CliRunner().invoke(main, ["train", str(extract()[1]), "--cache", str(store), "--out", str(tmp_path / "run"), "--epochs", "1"])
    assert damaged.exit_code == 1 and f"delete its done marker {DONE}/c/1 and rerun kdcache extract" in damaged.output, damaged.output
    (store / DONE / "c" / "1").unlink()
    result = CliRunner().invoke(main, [str(a) for a in extract("--out", store)])
    assert result.exit_code == 0 and "3 of 4 shards were already done" in result.output, result.output
    assert verify(str(store))["ok"]


@pytest.mark.parametrize("where", ["http", "zip"])
def test_a_damaged_shard_of_a_store_read_over_http_or_from_a_zip_names_a_fix_that_can_be_done_there(tmp_path: Path, tiny_store: str,
                                                                                                     where: str) -> None:
    """A done shard with wrong bytes, in a store served over plain HTTP or in a .zarr.zip whose member is whole as the zip
    sees it: the line said "copy the store again, or redo the shard: delete its done marker … and rerun kdcache extract",
    which cannot write either. It says what works there: the server's copy replaced, or a local copy redone; the zip
    copied or packed again from a folder whose shard is redone."""
    store = tmp_path / "www" / TRAIN
    shutil.copytree(tiny_store, store)
    flip_byte(store, LOGITS_SHARD_1, at=len((store / LOGITS_SHARD_1).read_bytes()) // 3)
    redo = f"delete its done marker {DONE}/c/1 and rerun kdcache extract (which skips done shards)"
    served = None
    if where == "http":
        served = served_folder(tmp_path / "www", "http.server")
        location = f"{next(served)[1]}/{TRAIN}"
        fix = ("a store read over HTTP cannot be changed by its reader: have the server's copy replaced from its source, or copy "
               f"the store to a local folder and redo the shard there: {redo}")
    else:
        location = str(tmp_path / "t.zarr.zip")
        with zipfile.ZipFile(location, "w", compression=zipfile.ZIP_STORED) as z:  # as pack writes it, its CRCs of these bytes
            for f in sorted(p for p in store.rglob("*") if p.is_file()):
                z.write(f, f.relative_to(store).as_posix())
        fix = ("a zip cannot be changed in place: copy the zip again, or pack it again (kdcache pack FOLDER OUT) from the folder "
               f"it was packed from once the shard is redone there: {redo}")
    try:
        damaged = CliRunner().invoke(main, ["train", str(extract()[1]), "--cache", location, "--out", str(tmp_path / "run"), "--epochs", "1"])
    finally:
        if served is not None:
            next(served, None)
    assert damaged.exit_code == 1 and damaged.stderr.strip().endswith(f"lists every damaged chunk; {fix}"), damaged.output


@pytest.mark.parametrize("lost", [LOGITS_SHARD_1, "samples/index/c/1", "progress/digest/c/1/0"], ids=["target", "index", "digest-row"])
def test_extract_redoes_a_done_shard_that_lost_an_object_without_the_marker_deleted(tmp_path: Path, tiny_store: str, lost: str) -> None:
    """The same, with nothing deleted by hand: extract took the store as complete ("nothing to do") and left it damaged.
    It now says which done shard lost which object, redoes it alone, and counts it as not done before the run."""
    store = tmp_path / TRAIN
    shutil.copytree(tiny_store, store)
    (store / lost).unlink()
    result = CliRunner().invoke(main, [str(a) for a in extract("--out", store)])
    assert result.exit_code == 0, result.output
    assert f"shard 1 (rows 16-31) was marked done but its object {lost!r} is missing" in result.output, result.output
    assert "3 of 4 shards were already done" in result.output and "already complete" not in result.output, result.output
    assert verify(str(store))["ok"]
    assert {k: v[0] for k, v in snapshot(store).items() if k != "zarr.json"} == {k: v[0] for k, v in snapshot(Path(tiny_store)).items() if k != "zarr.json"}


def fresh_manifest(store: Path) -> dict[str, Any]:
    """The manifest extract would pass to create_or_resume for ``store`` (what _create adds, removed)."""
    manifest = open_store(store).manifest
    return {k: v for k, v in manifest.items() if k not in ("format", "format_version", "created", "completed")}


@pytest.mark.parametrize("edit, match", [
    (lambda m: m["compression"].update(level=99), "the compression: ValueError: Value must be less than or equal to 22"),
    (lambda m: m["targets"]["logits"].update(dtype="float17"), "array 'targets/logits'"),
    (lambda m: m["geometry"]["chunk_rows"].update({LOGITS: 0}), "array 'targets/logits'"),
    (lambda m: m.update(pipeline={"not json": {1, 2}}), "the manifest: TypeError"),
], ids=["compression-level", "target-dtype", "chunk-rows-0", "manifest-not-json"])
def test_overwrite_keeps_the_old_store_when_the_new_one_cannot_be_created(tmp_path: Path, tiny_store: str, edit, match) -> None:
    """Every array of the new store is built (in memory) before anything of the old one is deleted."""
    store = tmp_path / TRAIN
    shutil.copytree(tiny_store, store)
    manifest = fresh_manifest(store)
    edit(manifest)
    before = snapshot(store)
    with pytest.raises(StoreError, match="nothing was written") as e:
        create_or_resume(str(store), lambda _: manifest, overwrite=True)
    assert match in str(e.value) and f"cannot create a store at {str(store)!r}" in str(e.value)
    assert snapshot(store) == before
    assert verify(str(store))["ok"]


def test_overwrite_with_a_valid_manifest_still_replaces_the_store(tmp_path: Path, tiny_store: str) -> None:
    store = tmp_path / TRAIN
    shutil.copytree(tiny_store, store)
    fresh = create_or_resume(str(store), lambda _: fresh_manifest(store), overwrite=True)
    assert not fresh.done().any() and not (store / LOGITS_SHARD_1).exists()


def test_pack_of_a_relative_location_copies_every_object(tmp_path: Path, tiny_store: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """zarr 3.1 lists the keys of a LocalStore at a relative root like "s" mangled ("progress/done" -> "progresdone"):
    pack once wrote a zip of only zarr.json and said it packed every object."""
    shutil.copytree(tiny_store, tmp_path / "s")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["pack", "s", "s.zarr.zip"])
    assert result.exit_code == 0, result.output
    assert verify("s.zarr.zip")["ok"]
    assert sorted(p.relative_to("s").as_posix() for p in Path("s").rglob("*") if p.is_file()) == open_store("s.zarr.zip").object_keys()
    assert [p.name for p in tmp_path.iterdir()] == ["s", "s.zarr.zip"] or sorted(p.name for p in tmp_path.iterdir()) == ["s", "s.zarr.zip"]
