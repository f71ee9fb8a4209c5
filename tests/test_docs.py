"""The documentation against the code: every command option, pipeline key, ``--set``, constant, environment variable
and test the docs name exists as named, the figures quoted beside a constant are its value, and FORMAT.md's plain-zarr
reader runs on a store written now. Cheap (no network, no model built) so that a renamed option or key fails here,
not in a user's terminal."""

from __future__ import annotations

import ast
import datetime
import importlib
import re
import textwrap
import tomllib
from functools import cache
from pathlib import Path

import pytest
from click.testing import CliRunner

import kdcache
from kdcache import pipeline
from kdcache.cli import main

ROOT = Path(__file__).resolve().parent.parent
DOCS = ["README.md", "docs/FORMAT.md", "docs/SHARING.md", "docs/CLUSTER.md", "benchmarks/RESULTS.md"]
USER_DOCS = DOCS[:4]  # RESULTS.md also names private functions and benchmark knobs, which are not the user's surface

# options the docs give to other tools (torchrun, dask's CLI, Slurm, docker, the benchmarks, kdcache itself)
OTHER_OPTIONS = {"--nproc-per-node", "--nnodes", "--node-rank", "--rdzv-endpoint", "--standalone", "--master-port", "--host", "--port", "--nworkers",
                 "--nthreads", "--requeue", "--net", "--version", "--check",
                 "--runs", "--jobs", "--replay", "--minutes",  # the tests/fuzz_*.py's, which README's Tests section names
                 "--latency"}  # benchmarks/count_requests.py's, which SHARING.md names
# dotted names in backticks that look like pipeline keys and are not: manifest keys (FORMAT.md §8), placeholders
NOT_PIPELINE_KEYS = {"teacher.class", "teacher.num_parameters", "teacher.weights_sha256",
                     "teacher.inputs",  # README: "there is no `teacher.inputs`"
                     "teacher.layer", "student.module",  # the train.features row's placeholder names
                     "targets.final_norm.mask"}  # the manifest's targets.<name>.mask of the text example
# environment variables the docs name that other libraries read (botocore, CUDA, dask, OpenMP)
READ_ELSEWHERE = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_ENDPOINT_URL", "CUDA_VISIBLE_DEVICES",
                  "DASK_DISTRIBUTED__WORKER__DAEMON", "OMP_NUM_THREADS", "OMP_WAIT_POLICY", "HDF5_USE_FILE_LOCKING"}
LIBRARY_CONSTANTS = {"F_FULLFSYNC", "ZIP_STORED"}  # os's and zipfile's
FILE_NAME = re.compile(r"\.(zarr|zip|h5|pt|py|toml|json)\b")  # student.pt, teacher.zarr.zip
PLACEHOLDER = re.compile(r"\b(?i:section|key|value|layer)\b|\b[KN]\b")  # --set SECTION.KEY=VALUE, train.streams=K


@cache
def text(doc: str) -> str:
    return (ROOT / doc).read_text(encoding="utf-8")


def spans(doc: str) -> list[str]:
    """Every fenced block (continuation lines joined) and every inline code span of ``doc``, whitespace collapsed."""
    blocks = re.findall(r"^```[a-z]*\n(.*?)^```", text(doc), re.S | re.M)
    rest = re.sub(r"^```.*?^```", "", text(doc), flags=re.S | re.M)
    inline = re.findall(r"`([^`]+)`", rest)
    lines = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    return [re.sub(r"\s+", " ", s) for s in lines + inline]


@cache
def help_options(command: str) -> frozenset[str]:
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0, result.output
    return frozenset(re.findall(r"(?<![\w-])--[a-z][a-z-]*", result.output))


def command_uses(doc: str) -> list[tuple[str, str]]:
    """(command, option) for each option a span gives a kdcache command: `kdcache train … --resume`, `verify --seed`."""
    found = []
    for span in spans(doc):
        for m in re.finditer(rf"(?<![\w/.-])({'|'.join(main.commands)}) ((?:[^\s|;,()#]+ )*?)(--[a-z][a-z-]*)", span):
            found.append((m.group(1), m.group(3)))
    return found


@pytest.mark.parametrize("doc", DOCS)
def test_every_option_the_docs_give_a_command_is_in_its_help(doc):
    unknown = sorted({f"kdcache {c} {o}" for c, o in command_uses(doc) if o not in help_options(c)})
    assert not unknown, f"{doc} names options these commands do not have: {unknown}"


@pytest.mark.parametrize("doc", USER_DOCS)
def test_every_option_the_docs_name_belongs_to_a_command(doc):
    known = set().union(*(help_options(c) for c in main.commands)) | OTHER_OPTIONS
    unknown = sorted(set(re.findall(r"(?<![\w-])--[a-z][a-z-]+", text(doc))) - known)
    assert not unknown, f"{doc} names options no kdcache command has: {unknown}"


def pipeline_keys() -> set[str]:
    keys = set()

    def walk(cls: type, prefix: str) -> None:
        for f in pipeline.dataclasses.fields(cls):
            keys.add(prefix + f.name)
            if f.default_factory is not pipeline.dataclasses.MISSING and pipeline.dataclasses.is_dataclass(f.default_factory):
                walk(f.default_factory, prefix + f.name + ".")

    for name, cls in pipeline._SECTIONS.items():
        walk(cls, name + ".")
    return keys


@pytest.mark.parametrize("doc", USER_DOCS)
def test_every_pipeline_key_the_docs_name_exists(doc):
    keys = pipeline_keys()
    named = {m.group(0) for span in spans(doc) for m in re.finditer(
        rf"(?<![\w./-])(?:{'|'.join(pipeline._SECTIONS)})\.[a-z_]+(?:\.[a-z_]+)?\b(?![/(])", span)}
    # a key's sub-key (train.loss.kl) or a name under a table value (targets.select.logits) counts as its key
    unknown = sorted(k for k in named - NOT_PIPELINE_KEYS if k not in keys and k.rsplit(".", 1)[0] not in keys and not FILE_NAME.search(k))
    assert not unknown, f"{doc} names pipeline keys the parser does not know: {unknown}"


def default(key: str) -> object:
    """The parser's default of the pipeline key ``key`` (``train.loss.kl``); ``""`` for a required factory."""
    section, *names = key.split(".")
    held: object = pipeline._SECTIONS[section]()
    for name in names:
        held = getattr(held, name)
    return list(held) if isinstance(held, tuple) else held


def test_readmes_table_of_pipeline_keys_gives_every_key_with_the_parsers_default():
    """README's table under *Pipeline files* is where a user reads what a key is set to when a pipeline leaves it out:
    each row's default (a TOML value in backticks; "required" for a factory) is the parser's, and every key the parser
    takes has a row (a table such as ``train.loss`` by its keys)."""
    table = text("README.md").split("\n## Pipeline files", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| ((?:`[a-z_.]+`(?: / |, )?)+) \| ([^|]+) \|", table, re.M)
    documented = set()
    for keys, defaults in rows:
        names = re.findall(r"`([a-z_.]+)`", keys)  # `train.loss.kl` / `temperature`: the second in the first's table
        names = [n if "." in n else f"{names[0].rsplit('.', 1)[0]}.{n}" for n in names]
        values = re.findall(r"`([^`]*)`", defaults) or ['""'] * len(names)  # "required": no default
        values = values * len(names) if len(values) == 1 else values  # `extract.threads`, `train.threads` | `0`
        assert len(values) == len(names), f"README's row for {names} gives {len(values)} defaults"
        for name, value in zip(names, values):
            assert tomllib.loads(f"v = {value}")["v"] == default(name), f"README: {name} defaults to {value}, the parser to {default(name)!r}"
        documented |= set(names)
    tables = {k.rsplit(".", 1)[0] for k in pipeline_keys()} - set(pipeline._SECTIONS)
    assert pipeline_keys() - tables - documented == set(), "pipeline keys without a row in README's table"


def test_readmes_counts_of_the_bad_input_tables_are_their_cases():
    """README's *Errors* gives the number of cases in each bad-input table (``tests/test_bad_input.py`` (247: …)): each is
    the length of that module's ``CASES``."""
    said = re.findall(r"`tests/(test_bad_input\w*)\.py` \((\d+):", re.sub(r"\s+", " ", text("README.md")))
    assert len(said) == 3, said
    for module, number in said:
        cases = importlib.import_module(module).CASES
        assert len(cases) == int(number), f"README says tests/{module}.py has {number} cases; its CASES holds {len(cases)}"


@pytest.mark.parametrize("doc", USER_DOCS)
def test_every_toml_block_of_the_docs_is_a_valid_pipeline(doc):
    blocks = re.findall(r"^```toml\n(.*?)^```", text(doc), re.S | re.M)
    for block in blocks:
        pipeline.from_dict(tomllib.loads(block), root=ROOT / "pipelines", source=f"{doc}'s TOML block")


@pytest.mark.parametrize("doc", DOCS)
def test_every_set_the_docs_give_is_accepted(doc):
    items = [next(g for g in m.groups() if g)
             for m in re.finditer(r"--set\s+(?:'([^']+)'|\"([^\"]+)\"|([^\s`)]+))", text(doc))]
    for item in items:
        if not PLACEHOLDER.search(item):
            kdcache.load_pipeline(ROOT / "pipelines" / "mnist.toml", [item])


def constant(name: str) -> object:
    """``NAME`` or ``module.NAME`` (``kdcache.`` optional) as a kdcache module holds it; KeyError where none does."""
    *module, attr = name.removeprefix("kdcache.").split(".")
    modules = [".".join(module)] if module else [p.stem for p in (ROOT / "kdcache").glob("*.py") if p.stem != "__main__"]
    for m in modules:
        held = importlib.import_module(f"kdcache.{m}")
        if hasattr(held, attr):
            return getattr(held, attr)
    raise KeyError(name)


@pytest.mark.parametrize("doc", USER_DOCS)
def test_every_constant_and_environment_variable_the_docs_name_exists(doc):
    source = "\n".join(p.read_text() for p in (ROOT / "kdcache").glob("*.py"))
    missing = []
    for span in spans(doc):
        for name in re.findall(r"^(?:kdcache\.)?(?:[a-z]+\.)?[A-Z][A-Z0-9]*_[A-Z0-9_]+$", span):
            bare = name.rsplit(".", 1)[-1]
            if bare in READ_ELSEWHERE | LIBRARY_CONSTANTS or re.search(rf"environ(?:\.get)?[(\[]\"{bare}\"", source):
                continue
            try:
                constant(name)
            except KeyError:
                missing.append(name)
    assert not missing, f"{doc} names constants or environment variables kdcache has not: {missing}"


@pytest.mark.parametrize("doc", USER_DOCS)
def test_the_figure_quoted_beside_a_constant_is_its_value(doc):
    flat = re.sub(r"\s+", " ", text(doc))
    for m in re.finditer(r"(\d[\d,]*(?:\.\d+)?) (s|hours|tries)\b[^`(]{0,30}\(`((?:kdcache\.)?(?:[a-z]+\.)?[A-Z][A-Z0-9_]+)`(?! less)", flat):
        value = constant(m.group(3))
        if isinstance(value, datetime.timedelta):
            value = value.total_seconds() / (3600 if m.group(2) == "hours" else 1)
        assert float(m.group(1).replace(",", "")) == value, f"{doc}: {m.group(0)!r}, but {m.group(3)} is {value}"


@pytest.mark.parametrize("doc", DOCS)
def test_every_test_the_docs_name_exists(doc):
    tests = "\n".join(p.read_text() for p in (ROOT / "tests").glob("*.py"))
    named = set(re.findall(r"\btest_[a-z0-9_]+\b(?!\.py)", text(doc)))
    missing = sorted(n for n in named if not re.search(rf"def {n}\(", tests) and not (ROOT / "tests" / f"{n}.py").exists())
    assert not missing, f"{doc} names tests that do not exist: {missing}"


@pytest.mark.parametrize("doc", USER_DOCS)
def test_every_python_name_the_docs_give_resolves(doc):
    for name in sorted({m for span in spans(doc) for m in re.findall(r"\bkdcache(?:\.[A-Za-z_]\w*)+", span)}):
        module, attr = name, []
        while True:
            try:
                held = importlib.import_module(module)
                break
            except ModuleNotFoundError:
                module, last = module.rsplit(".", 1)
                attr.insert(0, last)
        for part in attr:
            held = getattr(held, part)


@pytest.mark.parametrize("doc", DOCS)
def test_every_python_block_of_the_docs_is_python(doc, monkeypatch):
    """A user pastes a ```python block as it is: README's once held ``from_dict({"teacher": {...}, ...})``, a SyntaxError
    at its eleventh line, so none of it ran. A ``from_dict`` call in a block builds a pipeline as given (run from the
    repository root, where its factories' paths lead)."""
    monkeypatch.chdir(ROOT)
    for block in re.findall(r"^```python\n(.*?)^```", text(doc), re.S | re.M):
        tree = ast.parse(block)  # a SyntaxError names the line
        for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "from_dict"):
            built = eval(compile(ast.Expression(call), doc, "eval"), {"kdcache": kdcache})
            assert isinstance(built, pipeline.Pipeline), ast.unparse(call)


def unbound_names(block: str, known: set[str]) -> tuple[list[str], set[str]]:
    """The names ``block`` reads that neither it, ``known`` (what the doc's earlier blocks bound) nor the builtins bind,
    and the names it binds at its top level."""
    import builtins
    import symtable

    top = symtable.symtable(block, "<doc>", "exec")
    bound = known | {s.get_name() for s in top.get_symbols() if s.is_assigned() or s.is_imported()}
    read: set[str] = set()

    def walk(table: symtable.SymbolTable) -> None:
        read.update(s.get_name() for s in table.get_symbols() if s.is_referenced() and (table is top or s.is_global()))
        for child in table.get_children():
            walk(child)

    walk(top)
    return sorted(read - bound - set(dir(builtins))), bound


@pytest.mark.parametrize("doc", DOCS)
def test_every_name_a_python_block_of_the_docs_reads_is_bound_by_the_doc(doc):
    """A user pastes the doc's ```python blocks in order into one interpreter: each name they read is imported or
    assigned there (README's TransferSet loop read ``epochs``, ``student`` and ``kd_loss``, and ``kdcache`` unimported,
    a NameError at each). Cheaper than running them, which needs the MNIST store."""
    known: set[str] = set()
    for block in re.findall(r"^```python\n(.*?)^```", text(doc), re.S | re.M):
        unbound, known = unbound_names(block, known)
        assert not unbound, f"{doc}'s block\n{block}\nreads names it never binds: {unbound}"


def test_formats_plain_zarr_reader_and_digest_check_run_on_a_store_written_now(tiny_store):
    """FORMAT.md §15's two snippets, as written but for the store's path, read every done shard and check its digests."""
    blocks = re.findall(r"^```python\n(.*?)^```", text("docs/FORMAT.md"), re.S | re.M)
    reader = next(b for b in blocks if "zarr.open_group(\"/tmp/fmt.zarr\"" in b)
    digests = next(b for b in blocks if "google_crc32c.value" in b)
    scope: dict = {}
    exec(reader.replace("/tmp/fmt.zarr", tiny_store) + textwrap.indent(digests, "    "), scope)  # checked for every shard
    assert set(scope["targets"]) == {"logits", "features.3"} and scope["s"] == 3 and len(scope["fp"]) == 50 - 3 * 16


def test_formats_plain_h5py_and_zip_readers_run_on_an_export_and_a_pack_written_now(tiny_store, tmp_path, monkeypatch):
    """FORMAT.md §16's h5py reader and the zip store opening after it, as written (run where their tiny.h5 and t.zarr.zip
    are): a renamed attribute or dataset, or zarr's ZipStore API changing, fails here, not in a user's tool."""
    from kdcache import interop

    monkeypatch.chdir(tmp_path)
    interop.export_hdf5(tiny_store, "tiny.h5")
    interop.pack(tiny_store, "t.zarr.zip")
    blocks = re.findall(r"^```python\n(.*?)^```", text("docs/FORMAT.md"), re.S | re.M)
    scope: dict = {}
    exec(next(b for b in blocks if "h5py.File(\"tiny.h5\"" in b), scope)
    assert scope["logits"].shape == (50, 4) and scope["m"]["num_samples"] == 50
    exec(next(b for b in blocks if "ZipStore(\"t.zarr.zip\"" in b), scope)
    assert scope["g"].attrs["kdcache"]["num_samples"] == 50 and scope["g"]["targets/logits"].shape == (50, 4)


def json_keys(value: object) -> set[str]:
    """Every key of a JSON object and of the objects in it, but the keys that are data (class numbers, layer names)."""
    if isinstance(value, list):
        return set().union(*map(json_keys, value)) if value else set()
    if not isinstance(value, dict):
        return set()
    keys = {k for k in value if not k.isdigit() and k not in ("logits", "features.3")}
    return keys.union(*map(json_keys, value.values())) if value else keys


def test_every_field_info_stats_and_verify_print_as_json_is_in_sharing_md(tiny_store):
    """SHARING.md's "What --json prints" names each field of `info --json`, `stats --json` and `verify --json`: a field
    added or renamed in the code and not in the doc fails here."""
    from kdcache.stats import stats
    from kdcache.verify import verify

    section = text("docs/SHARING.md").split("## What `--json` prints", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"`([a-z_]+)`", section))
    info = kdcache.open_store(tiny_store).info()
    info_fields = json_keys({k: v for k, v in info.items() if k not in ("teacher", "dataset")})  # the manifest's (FORMAT.md §8)
    for command, fields in {"info": info_fields, "stats": json_keys(stats(tiny_store)), "verify": json_keys(verify(tiny_store))}.items():
        assert fields <= documented, f"kdcache {command} --json prints fields SHARING.md does not name: {sorted(fields - documented)}"


def test_the_keys_readme_says_the_demo_sets_itself_are_the_ones_it_refuses():
    from kdcache.demo import OWN_KEYS

    said = re.search(r"except\s+the ones the demo sets itself \((.*?), also inside a table", text("README.md"), re.S)
    assert said and set(re.findall(r"`([a-z_.]+)`", said.group(1))) == set(OWN_KEYS)


def format_tables(section: str) -> list[dict[str, list[str]]]:
    """The tables of FORMAT.md's ``section``, each as its first column's keys (backticks dropped) -> the other cells."""
    body = text("docs/FORMAT.md").split(f"\n## {section}", 1)[1].split("\n## ", 1)[0]
    tables = re.findall(r"^\|.*\|\n\|[-|]+\|\n(?:\|.*\|\n)+", body, re.M)
    return [{cells[0].strip("`"): cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")]
                                                           for line in table.splitlines()[2:])} for table in tables]


def test_formats_layout_and_manifest_tables_are_what_a_store_written_now_holds(tiny_store):
    """FORMAT.md §3's paths and data types, and §8's manifest keys, against tiny_store's zarr.json files."""
    import json

    root = Path(tiny_store)
    layout, = format_tables("3. Layout")
    for path, (_, dtypes, present) in layout.items():
        array = "targets/layers/features.3" if "<" in path else path  # targets/layers/<encoded name>
        if present != "always" and not (root / array / "zarr.json").exists():
            continue  # targets/logits_indices: a top-k store's
        written = json.loads((root / array / "zarr.json").read_text())["data_type"]
        assert written in re.findall(r"`(\w+)`", dtypes), f"FORMAT.md §3: {path} is {dtypes}, a store holds {written}"
    manifest = json.loads((root / "zarr.json").read_text())["attributes"]["kdcache"]
    flat = set()
    for key, value in manifest.items():  # §8 spells the keys of teacher, dataset, fingerprint, geometry, compression dotted
        flat |= {f"{key}.{sub}" for sub in value} if isinstance(value, dict) and key not in ("targets", "pipeline") else {key}
    keys, target_keys = format_tables("8. The manifest")
    assert flat == set(keys), f"FORMAT.md §8's manifest keys differ from a store's: {sorted(flat ^ set(keys))}"
    required = {k for k, (kind, _) in target_keys.items() if "optional" not in kind}
    for name, target in manifest["targets"].items():
        assert required <= set(target) <= required | set(target_keys), f"FORMAT.md §8's target object differs from {name}'s"
