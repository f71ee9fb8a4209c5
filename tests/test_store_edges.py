"""Edges of the store layer that the format documents: the ``.zarr.zip`` ``kdcache pack`` writes (FORMAT.md §17)
and the refusal of layer names that differ only in case (§6)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import zarr

from kdcache.errors import PipelineError
from kdcache.interop import pack
from kdcache.store import check_layer_names, open_store


def test_packed_zip_layout(tiny_store: str, tmp_path: Path) -> None:
    """§17: store keys at the zip root, in sorted order (the root zarr.json last), ZIP_STORED, bytes identical to
    the folder's objects; it opens with zarr.storage.ZipStore, not by passing its path to zarr.open_group."""
    out = tmp_path / "t.zarr.zip"
    pack(tiny_store, out)
    root = Path(tiny_store)
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    with zipfile.ZipFile(out) as z:
        members = z.infolist()
        assert [m.filename for m in members] == files and members[-1].filename == "zarr.json"
        assert {m.compress_type for m in members} == {zipfile.ZIP_STORED}
        assert all(z.read(m) == (root / m.filename).read_bytes() for m in members)
    group = zarr.open_group(zarr.storage.ZipStore(out, mode="r"), mode="r", zarr_format=3)
    assert group.attrs["kdcache"] == open_store(tiny_store).manifest
    with pytest.raises(FileNotFoundError):  # zarr takes a plain path as a folder: GroupNotFoundError
        zarr.open_group(str(out), mode="r")


@pytest.mark.parametrize("names, clash", [
    (["Conv", "conv"], ("Conv", "conv")),
    (["a", "block.Attn", "b", "block.attn"], ("block.Attn", "block.attn")),
    (["Ä", "ä"], None),  # percent-encoded as %C3%84 / %C3%A4: distinct on any file system
    (["x", "y", "x"], None),  # one name twice is not a collision between two layers
])
def test_layer_names_differing_only_in_case_are_refused(names: list[str], clash: tuple[str, str] | None) -> None:
    if clash is None:
        check_layer_names(names)
        return
    with pytest.raises(PipelineError, match=f"layer names '{clash[0]}' and '{clash[1]}' differ only in case"):
        check_layer_names(names)
