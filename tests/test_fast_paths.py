"""The performance paths produce exactly what the plain paths do: shard files byte for byte, fingerprints digit for digit."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from kdcache import data, store as layout


@pytest.mark.parametrize("dtype", ["float16", "float32", "int64", "uint64"])
@pytest.mark.parametrize("level", [None, 1, 5])
@pytest.mark.parametrize("shape,chunk", [((64, 4, 5), 8), ((64,), 16), ((64, 3), 64)])
@pytest.mark.parametrize("cuts", [[], [8, 16, 40], [5, 6, 29, 37, 63], [3, 13, 24, 48]], ids=["whole", "aligned", "straddling", "mixed"])
def test_whole_shard_write_is_byte_identical_to_zarr(tmp_path: Path, dtype: str, level: int | None, shape: tuple[int, ...], chunk: int,
                                                     cuts: list[int]):
    """Given as one array or as pieces (batches) cut anywhere, inside inner chunks too, the shard file is zarr's."""
    x = (np.maximum(np.random.default_rng(0).standard_normal(shape), 0) * 10).astype(dtype)
    compressors = [Crc32cCodec()] if level is None else [ZstdCodec(level=level), Crc32cCodec()]
    arrays = []
    for name in ("zarr", "fast"):
        group = zarr.open_group(tmp_path / name, mode="w")
        arrays.append(group.create_array("t/x", shape=(96, *shape[1:]), chunks=(chunk, *shape[1:]), shards=(64, *shape[1:]), dtype=dtype,
                                         compressors=compressors, fill_value=0, config={"write_empty_chunks": True}))
    arrays[0][0:64] = x
    pieces = [np.ascontiguousarray(p) for p in np.split(x, cuts)] if cuts else x  # copies: nothing shares x's memory
    assert layout._write_whole_shard(arrays[1], 0, pieces)
    files = {name: {str(f.relative_to(tmp_path / name)): f.read_bytes() for f in (tmp_path / name).rglob("*") if f.is_file()} for name in ("zarr", "fast")}
    assert files["zarr"] == files["fast"]
    np.testing.assert_array_equal(zarr.open_array(tmp_path / "fast" / "t/x")[:64], x)


def test_progress_markers_written_directly_are_zarrs_bytes(tmp_path: Path, monkeypatch):
    """The done marker and digest row of each shard (arrays with the bytes codec only) are written straight to their
    files: the same files, byte for byte, as zarr writes; another codec (or store) still goes through zarr."""
    from conftest import extract_tiny

    stores = {"fast": extract_tiny(tmp_path / "fast.zarr")}
    monkeypatch.setattr(layout, "_write_uncompressed_chunk", lambda *a: False)  # the plain path
    stores["zarr"] = extract_tiny(tmp_path / "zarr.zarr")
    progress = {name: {str(f.relative_to(s)): f.read_bytes() for f in Path(s, "progress").rglob("*") if f.is_file()} for name, s in stores.items()}
    assert progress["fast"] == progress["zarr"] and len(progress["fast"]) == 3 + 4 + 4  # three zarr.json, 4 markers, 4 digest rows
    monkeypatch.undo()
    done = zarr.open_group(tmp_path / "other", mode="w").create_array("d", shape=(4,), chunks=(1,), dtype=bool, compressors=[Crc32cCodec()])
    assert not layout._write_uncompressed_chunk(done, (1,), np.ones(1, dtype=bool)) and not list((tmp_path / "other" / "d").glob("c/*"))


@pytest.mark.parametrize("dtype", ["float16", "float32", "int64", "uint64"])
@pytest.mark.parametrize("level", [None, 1, 5])
@pytest.mark.parametrize("shape,chunk", [((100, 4, 5), 8), ((100,), 16), ((100, 3), 64)])
def test_whole_shard_read_equals_zarr(tmp_path: Path, dtype: str, level: int | None, shape: tuple[int, ...], chunk: int):
    """Shard 0 is whole (written by the fast path), shard 1 holds the last 36 rows (written by zarr: a partial
    inner chunk, and inner chunks past the end never written); both read back as zarr reads them."""
    x = (np.maximum(np.random.default_rng(1).standard_normal(shape), 0) * 10).astype(dtype)
    compressors = [Crc32cCodec()] if level is None else [ZstdCodec(level=level), Crc32cCodec()]
    a = zarr.open_group(tmp_path, mode="w").create_array("t/x", shape=shape, chunks=(chunk, *shape[1:]), shards=(64, *shape[1:]),
                                                          dtype=dtype, compressors=compressors, fill_value=0, config={"write_empty_chunks": True})
    assert layout._write_whole_shard(a, 0, x[:64])
    a[64:] = x[64:]
    for shard, rows in ((0, x[:64]), (1, x[64:])):
        got = layout._read_whole_shard(a, shard)
        assert got is not None and got.dtype == a.dtype
        np.testing.assert_array_equal(got, rows)
        np.testing.assert_array_equal(got, a[shard * 64 : shard * 64 + len(rows)])


def test_whole_shard_read_leaves_damage_to_zarr(tmp_path: Path):
    """Anything off (a flipped byte, a truncated or missing file, a non-local store) gives None, never values."""
    x = np.arange(64 * 3, dtype=np.float32).reshape(64, 3)
    a = zarr.open_group(tmp_path / "s", mode="w").create_array("x", shape=(64, 3), chunks=(8, 3), shards=(64, 3), dtype="float32",
                                                                compressors=[ZstdCodec(level=1), Crc32cCodec()], fill_value=0)
    assert layout._write_whole_shard(a, 0, x)
    file = layout._shard_file(a, 0)
    good = file.read_bytes()
    np.testing.assert_array_equal(layout._read_whole_shard(a, 0), x)
    for damaged in (good[:10] + bytes([good[10] ^ 1]) + good[11:], good[:-7], good[: len(good) // 2], b""):
        file.write_bytes(damaged)
        assert layout._read_whole_shard(a, 0) is None
    file.unlink()
    assert layout._read_whole_shard(a, 0) is None
    from google_crc32c import value as crc32c
    import numcodecs

    # every checksum right, but an inner chunk decompresses to 12 bytes instead of 96: no values, never garbage
    bodies = [numcodecs.Zstd(level=1).encode(x[i * 8 : (i + 1) * 8].tobytes() if i else x[:1].tobytes()) for i in range(8)]
    index, parts, offset = np.empty((8, 2), "<u8"), [], 0
    for i, body in enumerate(bodies):
        parts += [body, np.array([crc32c(body)], "<u4").tobytes()]
        index[i] = offset, len(body) + 4
        offset += len(body) + 4
    file.write_bytes(b"".join(parts) + index.tobytes() + np.array([crc32c(index.tobytes())], "<u4").tobytes())
    assert layout._read_whole_shard(a, 0) is None
    memory = zarr.open_group(zarr.storage.MemoryStore(), mode="w").create_array("x", shape=(64,), chunks=(8,), shards=(64,), dtype="f4")
    memory[:] = 1
    assert layout._read_whole_shard(memory, 0) is None


def test_partial_shard_is_left_to_zarr(tmp_path: Path):
    a = zarr.open_group(tmp_path, mode="w").create_array("x", shape=(40,), chunks=(16,), shards=(32,), dtype="float16", fill_value=0)
    assert not layout._write_whole_shard(a, 1, np.ones(8, np.float16))


@pytest.mark.parametrize("batch", [torch.randn(5, 1, 28, 28), torch.randn(5, 3).half(), torch.arange(5), torch.zeros(5, 0), torch.randn(5, 64, 64)])
def test_fingerprint_rows_equal_item_fingerprints(batch: torch.Tensor):
    assert data.fingerprint_rows(batch, range(5)) == [data.fingerprint(batch[i].clone()) for i in range(5)]
    assert data.fingerprint_rows(batch, [3, 1]) == [data.fingerprint(batch[3].clone()), data.fingerprint(batch[1].clone())]
    assert data.fingerprint_rows({"x": batch}, range(5)) is None


def test_a_fingerprint_is_of_the_values_not_of_their_memory_layout():
    """FORMAT.md §9: the same values in any layout are one input (a dataset that gives channels_last items at extraction
    and contiguous ones at training is not refused), also as rows of a batch; other values, dtypes or shapes are not."""
    rows = torch.randn(2, 3, 1, 5, generator=torch.Generator().manual_seed(0))
    x = rows.expand(2, 3, 4, 5).clone()  # equal rows along H: an expanded view (stride 0) holds the same values
    item = x[0].clone()
    flat = torch.cat([torch.zeros(3), x.reshape(-1)])
    laid = {
        "channels_last": x.contiguous(memory_format=torch.channels_last)[0],
        "transposed": item.transpose(1, 2).contiguous().transpose(1, 2),
        "slice-of-a-buffer": x[0],
        "storage-offset": flat[3 : 3 + item.numel()].view(3, 4, 5),
        "expanded": rows[0].expand(3, 4, 5),
        "requires-grad": item.clone().requires_grad_() * 1,
        "numpy": item.numpy().copy(),
        "numpy-column-major": np.asfortranarray(item.numpy()),
        "numpy-negative-strides": np.ascontiguousarray(item.numpy()[:, ::-1])[:, ::-1],
        "numpy-big-endian": item.numpy().astype(">f4"),
    }
    expected = data.fingerprint(item)
    for name, value in laid.items():
        assert data.fingerprint(value) == expected, name
        if isinstance(value, torch.Tensor):
            assert data.fingerprint_rows(torch.stack([value.detach(), value.detach()]), [1]) == [expected], name
    stride0 = torch.tensor(0.5).expand(3, 4)
    assert data.fingerprint(stride0) == data.fingerprint(torch.full((3, 4), 0.5))
    assert data.fingerprint(torch.tensor(0.5)) == data.fingerprint_rows(torch.tensor([0.25, 0.5]), [1])[0]
    others = [item.double(), item.reshape(5, 4, 3), item.transpose(1, 2), item + 1e-7, item.bool(), item.to(torch.uint8)]
    assert len({expected, *map(data.fingerprint, others)}) == 1 + len(others)


@pytest.mark.parametrize("shape", [(7, 3, 96, 96), (7, 3, 64, 64), (7, 10)], ids=["large-rows-in-threads", "48KB-rows-in-threads", "small-rows-inline"])
def test_fingerprints_of_large_and_small_tensors_equal_one_by_one(shape):
    """Rows of 16 KB and more are hashed in the thread pool (in uneven groups: 7 rows), rows of 40 B inline;
    both give fingerprint() of each item, in order."""
    batch = torch.randn(*shape, generator=torch.Generator().manual_seed(4))
    items = [batch[i].clone() for i in range(len(batch))]
    expected = [data.fingerprint(x) for x in items]
    assert data.fingerprints(items) == expected
    assert data.fingerprint_rows(batch, range(len(batch))) == expected
    assert len(set(expected)) == len(expected)
    indexed = data.Indexed(items, data.FINGERPRINT_ALGORITHM)
    assert [h for _, h, _, _ in indexed.__getitems__([5, 0, 3])] == [expected[5], expected[0], expected[3]]


def _child_fingerprints(items: list[torch.Tensor], out) -> None:
    out.put(data.fingerprints(items))


def test_a_forked_child_hashes_in_its_own_pool():
    """The parent's hash threads do not survive fork (DataLoader workers): the child must not wait on them forever."""
    import multiprocessing

    items = [torch.full((3, 96, 96), float(i)) for i in range(4)]  # 110 KB each: hashed in the pool
    expected = data.fingerprints(items)  # the parent's pool now exists
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    child = ctx.Process(target=_child_fingerprints, args=(items, out))
    child.start()
    try:
        assert out.get(timeout=30) == expected
    finally:
        child.join(timeout=30)
        if child.is_alive():
            child.kill()


def test_numbers_feed_the_fingerprint_what_the_tensors_torch_batches_them_as():
    """FORMAT.md §9: a number is hashed as the 0-d tensor default_collate makes of it (bool, int64, float64, a NumPy
    scalar's own dtype), its bytes made without the tensor (a list of 512 token ids was 7 ms an item through tensors)."""
    import enum

    from torch.utils.data import default_collate

    class Colour(enum.IntEnum):
        RED = 5

    for v in [0, -5, 2**63 - 1, -(2**63), 2.5, -0.0, float("inf"), True, False, Colour.RED,
              np.float64(2.5), np.int64(3), np.float32(0.5), np.bool_(True), np.uint8(7)]:
        batched = default_collate([v, v])[0]
        assert data.fingerprint(v) == data.fingerprint(batched) and data.fingerprint([v, v]) == data.fingerprint([batched, batched]), repr(v)
    ids = list(range(1000, 1512))
    assert data.fingerprint({"input_ids": ids}) == data.fingerprint({"input_ids": [torch.tensor(i) for i in ids]})
    assert data.fingerprint(2**63) != data.fingerprint(2**63 + 1)  # beyond int64 (torch batches no such int): framed repr


def test_inputs_without_plain_values_to_fingerprint_are_named_in_one_line():
    """A sparse tensor, an array of a dtype no tensor holds: a PipelineError naming it (it was a RuntimeError or
    TypeError traceback from the hash); a conjugate view is hashed as its values."""
    import warnings

    from kdcache.errors import PipelineError

    with pytest.raises(PipelineError, match=r"^a dataset item holds a sparse_coo tensor \(dtype float32\).*x.to_dense\(\)"):
        data.fingerprint({"x": torch.ones(2, 2).to_sparse()})
    with pytest.raises(PipelineError, match=r"^a dataset item holds a numpy array of dtype float128 \(shape \[1\]\), which torch cannot batch"):
        data.fingerprint(np.array([1.0], np.longdouble))
    with warnings.catch_warnings():  # torch 2.13 deprecates quantized tensors
        warnings.simplefilter("ignore")
        quantized = torch.quantize_per_tensor(torch.tensor([1.0, 2.0]), 0.1, 0, torch.quint8)
    with pytest.raises(PipelineError, match=r"^a dataset item holds a quantized tensor \(dtype quint8\).*x.dequantize\(\)"):
        data.fingerprint(quantized)
    z = torch.tensor([1 + 2j])
    assert data.fingerprint(z.conj()) == data.fingerprint(torch.tensor([1 - 2j]))


def test_read_shards_is_read_of_each_shard_with_its_errors(tiny_store: str, tmp_path: Path):
    """``Store.read_shards`` (the streaming reader's call for a buffer's shards of a column) gives each shard's rows as
    ``read`` does, in the order asked, and for a shard that is damaged, not done, or not a shard, ``read``'s error."""
    import shutil

    from kdcache.errors import StoreError

    store = layout.open_store(tiny_store)
    for path in store.paths():
        for shards in ([0], [3], [2, 0, 3], [1, 2, 3, 0], []):
            want = [store.read(path, *store.shard_rows(s)) for s in shards]
            got = store.read_shards(path, shards)
            np.testing.assert_array_equal(got, np.concatenate(want) if want else store.read(path, 0, 0))
            assert got.dtype == store.array(path).dtype

    def error(call) -> str:
        with pytest.raises(StoreError) as caught:
            call()
        return str(caught.value)

    logits = layout.LOGITS
    for damage in ("swapped", "truncated", "missing", "not done"):
        copy = tmp_path / damage
        shutil.copytree(tiny_store, copy)
        shard1, shard2 = (copy / logits / "c" / str(s) / "0" for s in (1, 2))
        if damage == "swapped":  # valid checksums, another shard's rows: the digest tells
            shard1.write_bytes(shard2.read_bytes())
        elif damage == "truncated":
            shard1.write_bytes(shard1.read_bytes()[:-9])
        elif damage == "missing":
            shard1.unlink()
        else:
            (copy / layout.DONE / "c" / "1").unlink()
        damaged = layout.open_store(str(copy))
        said = error(lambda: damaged.read(logits, 16, 32))
        assert error(lambda: layout.open_store(str(copy)).read_shards(logits, [0, 1, 2])) == said, damage
        np.testing.assert_array_equal(damaged.read_shards(logits, [2, 0]), store.read_shards(logits, [2, 0]))
    for shard in (4, -1, 1.0, True):
        assert error(lambda: store.read_shards(logits, [0, shard])).startswith(f"shard {shard!r} is not a shard of {tiny_store!r}; read shards 0 to 3")
    assert "is not a data array" in error(lambda: store.read_shards("targets/nothing", [0]))


def test_read_shards_of_an_array_sharded_otherwise_than_the_manifest_reads_as_read(tiny_store: str, tmp_path: Path):
    """An array whose zarr.json shards its rows otherwise than the manifest's rows_per_shard (rewritten by another
    zarr tool: zarr reads it, and ``read`` does) is read by ``read_shards`` as by ``read``: a shard is the manifest's
    rows, never the array's own shard of that number (half the rows, then called damaged by its digest)."""
    import json
    import shutil

    copy = tmp_path / "resharded.zarr"
    shutil.copytree(tiny_store, copy)
    logits = layout.LOGITS
    rows = layout.open_store(tiny_store).read(logits, 0, 50)
    meta = json.loads((copy / logits / "zarr.json").read_text())
    meta["chunk_grid"]["configuration"]["chunk_shape"][0] = 8
    meta["codecs"][0]["configuration"]["chunk_shape"][0] = 8
    shutil.rmtree(copy / logits / "c")
    (copy / logits / "zarr.json").write_text(json.dumps(meta))
    zarr.open_array(zarr.storage.LocalStore(copy), path=logits, mode="r+")[:] = rows
    store = layout.open_store(str(copy))
    for shards in ([0], [3], [2, 0]):
        want = np.concatenate([store.read(logits, *store.shard_rows(s)) for s in shards])
        np.testing.assert_array_equal(store.read_shards(logits, shards), want)


def test_the_direct_layout_of_one_metadata_at_two_paths_keys_each_path(tmp_path: Path):
    """The direct layout, worked out once per array metadata, holds the shard keys: two arrays of one metadata object
    at two paths (zarr may share it) each read their own file."""
    group = zarr.open_group(tmp_path, mode="w")
    a = group.create_array("a", shape=(8,), chunks=(8,), shards=(8,), dtype="int64", compressors=[Crc32cCodec()], fill_value=0)
    b = group.create_array("b", shape=(8,), chunks=(8,), shards=(8,), dtype="int64", compressors=[Crc32cCodec()], fill_value=0)
    a[:], b[:] = np.arange(8), np.arange(8) + 100
    twin = zarr.Array(dataclasses.replace(b._async_array, metadata=a.metadata))  # b's path, a's metadata object
    assert twin.metadata is a.metadata and twin.path == "b"
    np.testing.assert_array_equal(layout._read_whole_shard(a, 0), np.arange(8))
    np.testing.assert_array_equal(layout._read_whole_shard(twin, 0), np.arange(8) + 100)
