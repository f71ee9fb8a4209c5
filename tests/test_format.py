"""docs/FORMAT.md is enough to read a store: a reader that imports no kdcache checks a real one.

The reader runs in a fresh interpreter (zarr, numpy, hashlib, json, dask.array and the fixture's
own torch dataset only), follows the spec, and hands what it read back to this process, which
compares it with what ``kdcache.Store`` reads.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import zarr

import kdcache
from kdcache import data
from kdcache.errors import StoreError
from kdcache.store import DIGEST, LAYERS, layer_name, layer_path
from reference import without_the_digest_key

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
SPEC = ROOT / "docs" / "FORMAT.md"

CONFIGS = {
    # the fixture as is: zstd, float16, 16-row shards, one inner chunk per shard
    "default": [],
    # a shard that is not a power of two, several inner chunks per shard, no compression, float32
    "odd": [
        "extract.rows_per_shard=24",
        "extract.chunk_mb=0.01",
        'extract.compression="none"',
        'targets.dtype="float32"',
        'targets.layers=["features.1", "features.3"]',
    ],
}

# (input, fingerprint as hex of the integer) from docs/FORMAT.md §9; the reader recomputes them from numpy.
VECTORS = [
    ("float32 [1.0, 2.0]", "853bf4cbdcfaf1d3"),
    ("int16 [[0, 1], [2, 3]]", "d20e66265263ead9"),
    ("uint8 (0, 3)", "386398ec033feee6"),
    ('{"b": int64 [1, 2], "a": float32 [0.5]}', "f92a3a5180aa689c"),
    ("(float32 [1.0], bool [True, False])", "5772a3f3ed3e0629"),
    ("(1, 23)", "02e6e92a8a32ac13"),
    ("(12, 3)", "5e414d878f03763d"),
    ('(True, 2.5, "ab")', "71a422546bafcb21"),
    ("None", "0d03783d2cc7ef7c"),
]
# §9.1: blake2b-64 (kdcache <= 0.1.6) gives the first three vectors too, and these for the others it names
V1_VECTORS = {'{"b": int64 [1, 2], "a": float32 [0.5]}': "4228f605d7779292", "(float32 [1.0], bool [True, False])": "eef74ca45ea8ddd7",
              "(1, 23)": "2934750987465ddf", "(12, 3)": "2934750987465ddf"}
SCALARS = {"(1, 23)": (1, 23), "(12, 3)": (12, 3), '(True, 2.5, "ab")': (True, 2.5, "ab"), "None": None}
LINEAR_SHA256 = "71f47d20a275d478dd1e4a288b21d80b2cf617cf508ec3005c3bf9dc906b595b"


# The reader: written against docs/FORMAT.md only. argv: store, fixture .py, output folder.
READER = textwrap.dedent(
    r'''
    import hashlib, importlib.util, json, sys
    from pathlib import Path

    import numpy as np
    import zarr
    try:
        import dask.array as da
    except ImportError:  # dask is optional; everything else still runs
        da = None

    store, fixture, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    checks = []

    def check(cond, what):
        if not cond:
            raise SystemExit(f"spec violated: {what}")
        checks.append(what)

    # §2 identification
    g = zarr.open_group(str(store), mode="r", zarr_format=3)
    m = g.attrs.get("kdcache")
    check(isinstance(m, dict) and m.get("format") == "kdcache-store", "root attribute kdcache, format kdcache-store")
    check(m.get("format_version") == 1, "format_version 1")
    N, geo = m["num_samples"], m["geometry"]
    R, S = geo["rows_per_shard"], geo["num_shards"]
    check(N >= 1 and R >= 1 and S == max(1, -(-N // R)), "num_shards = ceil(N / R)")
    check(m["dataset"]["length"] == N, "dataset.length == num_samples")
    check(m["fingerprint"]["algorithm"] == "blake2b-64-v2", "fingerprint algorithm")

    # §6 decoding: plain percent-decoding, then UTF-8
    def decode(s):
        raw, i = bytearray(), 0
        while i < len(s):
            if s[i] == "%":
                raw.append(int(s[i + 1:i + 3], 16)); i += 3
            else:
                raw += s[i].encode(); i += 1
        return raw.decode("utf-8")

    def meta(path):
        return json.loads((store / path / "zarr.json").read_text())

    # §3 layout and §3.1 encoding, read from the raw zarr.json of every data array
    comp = m["compression"]
    inner = ["bytes", "zstd", "crc32c"] if comp["codec"] == "zstd" else ["bytes", "crc32c"]
    columns = {"samples/index": ([], "int64"), "samples/fingerprint": ([], "uint64")}
    if m["has_labels"]:
        columns["samples/label"] = ([], "int64")
    check(("label" in g["samples"]) == m["has_labels"], "samples/label present iff has_labels")
    decoded = {}
    for name, t in m["targets"].items():
        check(t["name"] == name and t["dtype"] in ("float16", "float32"), f"target {name!r} entry")
        if t["source"] == "":
            check(t["path"] == "targets/logits", "model output at targets/logits")
        else:
            node = t["path"][len("targets/layers/"):]
            check(t["path"].startswith("targets/layers/") and "/" not in node and node not in (".", "..")
                  and not node.startswith("__") and node.isascii(), f"{t['path']!r} is one safe node name")
            decoded[t["path"]] = decode(node)
            check(decoded[t["path"]] == name == t["source"], f"{t['path']!r} decodes to {name!r}")
        columns[t["path"]] = (t["shape"], t["dtype"])
    check(set(geo["chunk_rows"]) == set(columns), "chunk_rows covers every data array")

    values, dask_chunks = {}, {}
    for path, (shape, dtype) in columns.items():
        j = meta(path)
        C = geo["chunk_rows"][path]
        check(j["node_type"] == "array" and j["shape"] == [N, *shape] and j["data_type"] == dtype, f"{path} shape/dtype")
        check(j["chunk_grid"]["configuration"]["chunk_shape"] == [R, *shape], f"{path} shard = rows_per_shard rows")
        check(j["chunk_key_encoding"] == {"name": "default", "configuration": {"separator": "/"}}, f"{path} chunk keys")
        (codec,) = j["codecs"]
        cfg = codec["configuration"]
        check(codec["name"] == "sharding_indexed" and cfg["index_location"] == "end", f"{path} sharding_indexed")
        check(cfg["chunk_shape"] == [C, *shape] and 1 <= C <= R and R % C == 0, f"{path} inner chunk = chunk_rows")
        check([c["name"] for c in cfg["codecs"]] == inner, f"{path} inner codecs {inner}")
        check(cfg["codecs"][0].get("configuration", {}).get("endian") == "little", f"{path} little endian")
        if comp["codec"] == "zstd":
            check(cfg["codecs"][1]["configuration"]["level"] == comp["level"], f"{path} zstd level")
        check([c["name"] for c in cfg["index_codecs"]] == ["bytes", "crc32c"], f"{path} index checksum")
        check(j["fill_value"] == 0, f"{path} fill value 0")
        check(j["dimension_names"] == ["sample"] + [f"dim_{i}" for i in range(len(shape))], f"{path} dimension names")
        a = g[path]
        check(a.shape == (N, *shape) and a.dtype == np.dtype(dtype), f"{path} opens with zarr")
        values[path] = a[:]
        if da is not None:
            lazy = da.from_zarr(a)
            dask_chunks[path] = [list(c) for c in lazy.chunks]
            check(np.array_equal(lazy.compute(), values[path]), f"{path} reads the same with dask")
        if dtype.startswith("float"):
            check(bool(np.isfinite(values[path]).all()), f"{path} finite")

    # §7 completeness
    j = meta("progress/done")
    check(j["shape"] == [S] and j["data_type"] == "bool" and j["chunk_grid"]["configuration"]["chunk_shape"] == [1]
          and j["fill_value"] is False and [c["name"] for c in j["codecs"]] == ["bytes"], "progress/done encoding")
    done = g["progress/done"][:]
    check(bool(done.all()) and m["completed"] is not None, "complete store")

    # §4 sample arrays and §9 fingerprints, recomputed from the fixture's own dataset
    check(np.array_equal(values["samples/index"], np.arange(N)), "index[r] == r")

    def le_bytes(a):  # elements in C order, each little-endian
        return np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<")).tobytes()

    def feed(h, v):
        if hasattr(v, "detach"):  # a torch tensor: its dtype name, shape, little-endian bytes
            t = v.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(le_bytes(t.reshape(-1).numpy()))
        elif isinstance(v, np.ndarray):  # hashed as the tensor of the same dtype and shape
            names = {"float32": "float32", "float64": "float64", "float16": "float16", "int8": "int8", "int16": "int16",
                     "int32": "int32", "int64": "int64", "uint8": "uint8", "bool": "bool"}
            h.update(f"torch.{names[v.dtype.name]}{tuple(v.shape)}".encode())
            h.update(le_bytes(v))
        elif isinstance(v, (np.bool_, np.number)):  # a NumPy scalar: the 0-d array of its dtype
            feed(h, np.asarray(v))
        elif isinstance(v, bool):  # a number: the 0-d tensor torch batches it as
            feed(h, np.array(v))
        elif isinstance(v, int) and -2**63 <= v < 2**63:
            feed(h, np.array(v, np.int64))
        elif isinstance(v, float):
            feed(h, np.array(v, np.float64))
        elif isinstance(v, str):
            raw = v.encode("utf-8", "surrogatepass")
            h.update(f"str({len(raw)},)".encode() + raw)
        elif isinstance(v, bytes):
            h.update(f"bytes({len(v)},)".encode() + v)
        elif isinstance(v, dict):
            h.update(f"dict({len(v)},)".encode())
            for k in sorted(v, key=lambda k: ("str" if isinstance(k, str) else type(k).__name__, k)):
                feed(h, k)
                feed(h, v[k])
        elif isinstance(v, (tuple, list)):
            h.update(f"list({len(v)},)".encode())
            for x in v:
                feed(h, x)
        else:
            raw = repr(v).encode("utf-8", "surrogatepass")
            h.update(f"{type(v).__name__}({len(raw)},)".encode() + raw)

    def fingerprint(inputs):
        h = hashlib.blake2b(digest_size=8)
        feed(h, inputs)
        return int.from_bytes(h.digest(), "little")

    def split(item):  # the model input and the label of a dataset item
        if hasattr(item, "detach"):
            return item, None
        if isinstance(item, (tuple, list)):
            return item[0], (int(item[1]) if len(item) > 1 else None)
        return {k: v for k, v in item.items() if k not in ("label", "labels")}, item.get("label", item.get("labels"))

    spec = importlib.util.spec_from_file_location("tiny_fixture", fixture)
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    dataset = tiny.dataset(m["dataset"]["split"])
    fps = [fingerprint(split(dataset[i])[0]) for i in range(N)]
    check(values["samples/fingerprint"].tolist() == fps, "stored fingerprints == recomputed (§9)")
    if m["has_labels"]:
        check(values["samples/label"].tolist() == [split(dataset[i])[1] for i in range(N)], "labels")
    probe = {str(i): f"{fps[i]:016x}" for i in sorted({0, N - 1})}
    check(m["dataset"]["probe_fingerprints"] == probe, "probe_fingerprints are hex of the integer")

    # §10 weights hash, recomputed from the fixture's teacher
    h = hashlib.sha256()
    for key, t in sorted(tiny.teacher().state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(le_bytes(t.reshape(-1).numpy()))
    check(h.hexdigest() == m["teacher"]["weights_sha256"], "weights_sha256 (§10)")

    # §9 test vectors, from numpy arrays only
    vectors = {
        "float32 [1.0, 2.0]": np.array([1.0, 2.0], np.float32),
        "int16 [[0, 1], [2, 3]]": np.arange(4, dtype=np.int16).reshape(2, 2),
        "uint8 (0, 3)": np.zeros((0, 3), np.uint8),
        '{"b": int64 [1, 2], "a": float32 [0.5]}': {"b": np.array([1, 2], np.int64), "a": np.array([0.5], np.float32)},
        "(float32 [1.0], bool [True, False])": (np.array([1.0], np.float32), np.array([True, False])),
        "(1, 23)": (1, 23), "(12, 3)": (12, 3), '(True, 2.5, "ab")': (True, 2.5, "ab"), "None": None,
    }
    vectors = {k: f"{fingerprint(v):016x}" for k, v in vectors.items()}

    check("kdcache" not in sys.modules, "no kdcache import")
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "values.npz", **{f"a{i}": v for i, v in enumerate(values.values())})
    (out / "result.json").write_text(json.dumps({
        "paths": list(values), "decoded": decoded, "done": done.tolist(), "vectors": vectors,
        "dask": da is not None, "dask_chunks": dask_chunks, "checks": checks,
        "modules": sorted(k for k in sys.modules if k.split(".")[0] == "kdcache"),
    }))
    '''
)


@pytest.fixture(scope="module", params=list(CONFIGS))
def built(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"format-{request.param}") / "store.zarr"
    info = kdcache.extract(kdcache.load_pipeline(FIXTURES / "tiny.toml", CONFIGS[request.param]), str(out))
    assert info["complete"]
    return out


def run_reader(store: Path, out: Path) -> dict:
    script = out / "reader.py"
    out.mkdir(parents=True, exist_ok=True)
    script.write_text(READER)
    proc = subprocess.run(
        [sys.executable, str(script), str(store), str(FIXTURES / "tiny.py"), str(out / "result")],
        capture_output=True, text=True, timeout=240, cwd=out,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads((out / "result" / "result.json").read_text())


def test_plain_zarr_reader_matches_kdcache(built, tmp_path):
    result = run_reader(built, tmp_path)
    assert result["modules"] == []
    store = kdcache.open_store(built)
    # the reader found exactly kdcache's arrays, and the same values in them
    assert result["paths"] == store.paths()
    with np.load(tmp_path / "result" / "values.npz") as npz:
        for i, path in enumerate(result["paths"]):
            theirs, ours = npz[f"a{i}"], store.read(path, 0, store.num_samples)
            assert theirs.dtype == ours.dtype and theirs.shape == ours.shape, path
            assert np.array_equal(theirs, ours), path
    assert result["done"] == store.done().tolist()
    # layer paths decode to kdcache's names (and to the pipeline's layer names)
    assert result["decoded"] == {p: layer_name(p) for p in store.paths() if p.startswith(LAYERS)}
    assert sorted(result["decoded"].values()) == sorted(store.manifest["pipeline"]["targets"]["layers"])
    # fingerprints: the reader recomputed them from the dataset and they matched the store; kdcache agrees
    pipeline = kdcache.load_pipeline(FIXTURES / "tiny.toml")
    dataset = pipeline.resolve(pipeline.data.factory)(pipeline.data.split)
    stored = store.read("samples/fingerprint", 0, store.num_samples)
    assert stored.tolist() == [data.fingerprint(data.split_item(dataset[i])[0]) for i in range(len(dataset))]
    # §9 test vectors: the spec's table, the independent reader and kdcache all agree
    spec = SPEC.read_text()
    for label, hexfp in VECTORS:
        assert result["vectors"][label] == hexfp, label
        assert f"`{hexfp}` = {int(hexfp, 16)}" in spec, label
    if result["dask"]:
        for path, chunks in result["dask_chunks"].items():
            rows = store.manifest["geometry"]["chunk_rows"][path]  # dask chunks by inner chunk
            assert sum(chunks[0]) == store.num_samples and set(chunks[0][:-1]) <= {rows}, path


def test_spec_vectors_match_kdcache():
    import torch

    vectors = {
        "float32 [1.0, 2.0]": torch.tensor([1.0, 2.0]),
        "int16 [[0, 1], [2, 3]]": torch.arange(4, dtype=torch.int16).reshape(2, 2),
        "uint8 (0, 3)": torch.zeros(0, 3, dtype=torch.uint8),
        '{"b": int64 [1, 2], "a": float32 [0.5]}': {"b": torch.tensor([1, 2]), "a": torch.tensor([0.5])},
        "(float32 [1.0], bool [True, False])": (torch.tensor([1.0]), torch.tensor([True, False])),
        **SCALARS,
    }
    for label, hexfp in VECTORS:
        assert f"{data.fingerprint(vectors[label]):016x}" == hexfp, label
        if label not in SCALARS or label in V1_VECTORS:  # §9.1
            assert f"{data.fingerprint(vectors[label], data.V1):016x}" == V1_VECTORS.get(label, hexfp), label
            assert f"`{V1_VECTORS.get(label, hexfp)}`" in SPEC.read_text(), label
    # §9's 0-d example: a 0-d tensor, a 0-d array and a NumPy scalar alike; a number as the tensor torch batches it as
    spec = SPEC.read_text()
    assert "fingerprint `ac7c6efebf53e602`" in spec and "fingerprint `04e05bc5729ac97a`" in spec and "`2934750987465ddf`" in spec
    for zero_d in (torch.tensor(0.5), np.array(0.5, np.float32), np.float32(0.5), np.array(0.5, ">f4")):
        assert f"{data.fingerprint(zero_d):016x}" == "ac7c6efebf53e602", zero_d
    assert data.fingerprint(1) == data.fingerprint(torch.tensor(1)) and data.fingerprint(2.5) == data.fingerprint(torch.tensor(2.5, dtype=torch.float64))
    assert data.fingerprint(True) == data.fingerprint(torch.tensor(True)) != data.fingerprint(1)
    # §9.1: blake2b-64 fed numbers by bare repr() and a 0-d array as (1,)
    assert f"{data.fingerprint(np.array(0.5, np.float32), data.V1):016x}" == f"{data.fingerprint(torch.tensor([0.5])):016x}" == "04e05bc5729ac97a"
    assert f"{data.fingerprint((1, 23), data.V1):016x}" == f"{data.fingerprint((12, 3), data.V1):016x}" == "2934750987465ddf"


def test_inputs_of_one_structure_feed_one_stream_each():
    """Every part is framed (FORMAT.md §9): lists by their length, so moving an element between sibling lists (where a
    sentence pair's segments split) is another input; keys by their type; a string subclass is the string the
    teacher gets, bytes their bytes. blake2b-64 (§9.1) could not tell the first of these apart."""
    import torch

    fp = data.fingerprint
    ones = torch.ones
    for a, b in [(([1, 2], [3]), ([1], [2, 3])), (((), (1,)), ((1,), ())), ([[ones(2), ones(2)], [ones(1)]], [[ones(2)], [ones(2), ones(1)]]),
                 ({"x": {1: 5}}, {"x": {"1": 5}}), ({"a": 1, "b": 2}, {"a": 2, "b": 1}), ("ab", b"ab"), (0.0, -0.0), (1, True), ((1, 23), (12, 3))]:
        assert fp(a) != fp(b), (a, b)
    assert fp(([1, 2], [3]), data.V1) == fp(([1], [2, 3]), data.V1)  # the premise
    assert fp(np.str_("ab")) == fp("ab") and fp((1, 2)) == fp([1, 2]) and fp({"a": 1}) == fp({"a": np.int64(1)})
    assert fp({"x": {np.str_("a"): 1, "b": 2}}) == fp({"x": {"a": 1, "b": 2}})
    big = np.array([[0, 1], [2, 3]], dtype=">i2")
    assert f"{data.fingerprint(big):016x}" == f"{data.fingerprint(big.astype('<i2')):016x}" == dict(VECTORS)["int16 [[0, 1], [2, 3]]"]
    linear = torch.nn.Linear(1, 1)
    with torch.no_grad():
        linear.weight.fill_(2.0), linear.bias.fill_(0.5)
    assert kdcache.teacher.weights_sha256(linear) == LINEAR_SHA256
    assert LINEAR_SHA256 in SPEC.read_text()


def test_crc32c_combine_is_the_crc32c_of_the_joined_bytes():
    """The writer's shard digest for codec none is combined from its inner chunks' crc32c (§7.1's value, one pass)."""
    import google_crc32c

    from kdcache.store import crc32c_combine, shard_digest

    rng = np.random.default_rng(0)
    for n1, n2 in [(0, 0), (1, 0), (0, 1), (3, 7), (4096, 1 << 20), (12345, 1), (1, 1 << 33 >> 10)]:
        a, b = rng.bytes(n1), rng.bytes(n2)
        assert crc32c_combine(google_crc32c.value(a), google_crc32c.value(b), n2) == google_crc32c.value(a + b), (n1, n2)
    rows = np.arange(16, 48, dtype=np.int64)
    raw = rows.view(np.uint8)
    parts = [(google_crc32c.value(raw[i : i + 64].tobytes()), len(raw[i : i + 64])) for i in range(0, len(raw), 64)]
    assert shard_digest("samples/index", 1, [rows], parts) == shard_digest("samples/index", 1, [rows[:2], rows[2:]])
    assert shard_digest("samples/index", 1, [rows], parts[:-1]) == shard_digest("samples/index", 1, [rows])  # not the rows' bytes: recomputed
    assert shard_digest("samples/index", 1, [rows[:2]]) == 0x15C0E0C5


@pytest.mark.parametrize("n2", [2**29 - 1, 2**29, 2**29 + 12345, 2**32 + 3])
def test_crc32c_combine_holds_for_inner_chunks_of_512_mib_and_more(n2):
    """An inner chunk of codec none may hold up to a shard's 4 GiB (extract.chunk_mb): zlib's table of x^(2^k) cycles
    with period 32 for its polynomial, not for Castagnoli's, so lengths from 2^29 bytes on must not wrap it."""
    import google_crc32c

    from kdcache.store import crc32c_combine

    zeros = np.zeros(2**24, np.uint8)  # B = n2 zero bytes, its crc32c extended 16 MiB at a time (no big buffer)
    head = b"shard 7 of targets/logits"
    whole, alone = google_crc32c.value(head), 0
    left = n2
    while left:
        piece = zeros[: min(left, len(zeros))]
        whole, alone, left = google_crc32c.extend(whole, piece), google_crc32c.extend(alone, piece), left - len(piece)
    assert crc32c_combine(google_crc32c.value(head), alone, n2) == whole


def test_zarr_json_geometry_matches_manifest(built):
    store = kdcache.open_store(built)
    geo = store.manifest["geometry"]
    rows, n = geo["rows_per_shard"], store.num_samples
    assert geo["num_shards"] == max(1, -(-n // rows))
    assert set(geo["chunk_rows"]) == set(store.paths())
    for path in store.paths():
        meta = json.loads((built / path / "zarr.json").read_text())
        per_sample = list(store.array(path).shape[1:])
        (codec,) = meta["codecs"]
        assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [rows, *per_sample], path
        assert codec["configuration"]["chunk_shape"] == [geo["chunk_rows"][path], *per_sample], path
        assert rows % geo["chunk_rows"][path] == 0, path
        arr = zarr.open_array(str(built / path), mode="r")  # and zarr reports the same geometry
        assert arr.shards == (rows, *per_sample) and arr.chunks == (geo["chunk_rows"][path], *per_sample), path
        # one storage object per shard, named c/<s>/0/...
        assert sorted(int(p.name) for p in (built / path / "c").iterdir()) == list(range(geo["num_shards"])), path
    done = json.loads((built / "progress" / "done" / "zarr.json").read_text())
    assert done["shape"] == [geo["num_shards"]] and done["chunk_grid"]["configuration"]["chunk_shape"] == [1]


def test_unknown_version_and_foreign_groups_are_refused(built, tmp_path):
    copy = tmp_path / "copy.zarr"
    shutil.copytree(built, copy)
    g = zarr.open_group(str(copy), mode="r+", zarr_format=3)
    manifest = dict(g.attrs["kdcache"], format_version=3, some_future_key={"x": 1})  # 2: a store of top-k logits (§5.1)
    g.attrs["kdcache"] = manifest
    with pytest.raises(StoreError, match="version 3"):
        kdcache.open_store(copy)
    g.attrs["kdcache"] = dict(manifest, format_version=1)  # unknown extra keys are ignored
    assert kdcache.open_store(copy).complete
    g.attrs["kdcache"] = dict(manifest, format="something-else", format_version=1)
    with pytest.raises(StoreError, match="not a kdcache store"):
        kdcache.open_store(copy)


# -- layer name encoding (§6) -------------------------------------------------------------------

AWKWARD = ["..", ".", "...", "a/b", "/abs", "__reserved", "_x", "_x_y", "a_b", "encoder.layer.5",
           "héllo wörld", "a%2Fb", "a~b", "日本語", "x:y*z?", "A", ".hidden", "trailing."]
SAFE = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-%")


def spec_encode(name: str) -> str:
    """docs/FORMAT.md §6, step by step, independently of kdcache."""
    out = "".join(chr(b) if chr(b) in SAFE - {"%"} else f"%{b:02X}" for b in name.encode("utf-8"))
    if out.startswith("_"):
        out = out.replace("_", "%5F")
    if set(out) == {"."}:
        out = out.replace(".", "%2E")
    return out


@pytest.mark.parametrize("name", AWKWARD)
def test_layer_path_round_trip(name):
    path = layer_path(name)
    assert path.startswith(LAYERS)
    node = path[len(LAYERS):]
    assert node == spec_encode(name)
    assert node and "/" not in node and node not in (".", "..") and not node.startswith("__")
    assert set(node) <= SAFE
    assert layer_name(path) == name


def test_empty_layer_name_is_an_error():
    with pytest.raises(StoreError, match="empty"):
        layer_path("")


def test_awkward_names_as_zarr_arrays(tmp_path):
    root = zarr.open_group(str(tmp_path / "names.zarr"), mode="w", zarr_format=3)
    for i, name in enumerate(AWKWARD):
        arr = root.create_array(layer_path(name), shape=(3, 2), chunks=(3, 2), shards=(3, 2), dtype="float32", fill_value=0)
        arr[:] = np.full((3, 2), i, np.float32)
    reopened = zarr.open_group(str(tmp_path / "names.zarr"), mode="r", zarr_format=3)
    layers = reopened["targets/layers"]
    members = sorted(layers.array_keys())
    assert members == sorted(layer_path(n)[len(LAYERS):] for n in AWKWARD)
    assert sorted(layer_name(LAYERS + m) for m in members) == sorted(AWKWARD)
    for i, name in enumerate(AWKWARD):
        assert np.array_equal(reopened[layer_path(name)][:], np.full((3, 2), i, np.float32)), name
    # nothing escaped targets/layers/
    assert sorted(p.name for p in (tmp_path / "names.zarr").iterdir()) == ["targets", "zarr.json"]
    assert sorted(p.name for p in (tmp_path / "names.zarr" / "targets").iterdir()) == ["layers", "zarr.json"]


def rename_layer(store: Path, old: str, name: str, node: str) -> None:
    """Rename layer target ``old`` of ``store`` to ``name``, its array folder to ``targets/layers/<node>``."""
    (store / LAYERS / layer_path(old)[len(LAYERS):]).rename(store / LAYERS / node)
    meta = json.loads((store / "zarr.json").read_text())
    m = meta["attributes"]["kdcache"]
    target = m["targets"].pop(old)
    m["targets"][name] = dict(target, name=name, source=name, path=LAYERS + node)
    m["geometry"]["chunk_rows"][LAYERS + node] = m["geometry"]["chunk_rows"].pop(layer_path(old))
    (store / "zarr.json").write_text(json.dumps(meta))


def test_legacy_unencoded_tilde_is_read(tiny_store, tmp_path):
    """§6: the first 0.1.0 commit left ``~`` unencoded in layer paths (``targets/layers/~t``); such a store reads
    and verifies like one with ``%7Et``. Only that legacy form is accepted: any other path is still refused."""
    from kdcache.verify import verify

    expected = kdcache.open_store(tiny_store).read(layer_path("features.3"), 0, 50)
    for node in ("~t.~3", "%7Et.%7E3"):
        store = tmp_path / f"{node}.zarr"
        shutil.copytree(tiny_store, store)
        rename_layer(store, "features.3", "~t.~3", node)
        shutil.rmtree(store / DIGEST)  # a store of that commit had no shard digests (they bind rows to their path too)
        without_the_digest_key(store)
        opened = kdcache.open_store(store)
        assert opened.targets["~t.~3"].path == LAYERS + node and layer_name(LAYERS + node) == "~t.~3"
        np.testing.assert_array_equal(opened.read(LAYERS + node, 0, 50), expected)
        assert verify(str(store))["ok"]
    store = tmp_path / "other.zarr"
    shutil.copytree(tiny_store, store)
    rename_layer(store, "features.3", "a b~", "a b~")  # the space unencoded too: not the legacy form
    with pytest.raises(StoreError, match=r"targets\.a b~\.path = 'targets/layers/a b~', expected 'targets/layers/a%20b%7E'"):
        kdcache.open_store(store)
