"""Restores trust nothing the bucket says about names and modes: every attack fails with a typed error and
writes nothing outside DEST (nor, for a bad entry, anything at all)."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from castore.backends.file import FileBackend
from castore.cli import main
from castore.errors import FormatError, UnsafeTreeError
from castore.format import keys
from castore.format.manifest import Manifest, TreeEntry
from castore.store import Store, extract_tree

NS = "restore"


def _plant_tree(store: Store, key: str, files: list[tuple[str, str, int, bytes]]) -> None:
    """Publish a tree manifest as a hostile writer would: any names, modes and types."""
    blob = b"".join(content for _, typ, _, content in files if typ == "f")
    entries = [TreeEntry(path, typ, mode, len(content)) for path, typ, mode, content in files]
    from castore.format import codec as codecs

    m = Manifest(namespace=NS, key=key, size=len(blob), digest=hashlib.sha256(blob).digest(), kind="tree", files=entries)
    m.inline = codecs.encode_chunk(blob)[0]
    store.backend.put(keys.manifest_path(NS, key), m.to_bytes())


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(FileBackend(str(tmp_path / "store")), workers=2)


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_setuid_setgid_sticky_and_world_writable_bits_are_dropped(store: Store, tmp_path: Path) -> None:
    _plant_tree(store, "modes", [("d", "d", 0o1777, b""), ("d/suid", "f", 0o4755, b"x"), ("sgid", "f", 0o2775, b"y"),
                                 ("open", "f", 0o666, b"z")])
    dest = tmp_path / "dest"
    assert store.get_tree(NS, "modes", dest)
    assert stat.S_IMODE((dest / "d").stat().st_mode) == 0o755
    assert stat.S_IMODE((dest / "d/suid").stat().st_mode) == 0o755
    assert stat.S_IMODE((dest / "sgid").stat().st_mode) == 0o755
    assert stat.S_IMODE((dest / "open").stat().st_mode) == 0o644


@pytest.mark.parametrize(
    "bad",
    [".", "..", "", "a/../b", "/etc/passwd", "a\x00b", "a//b", "./a", "a/.", "x" * 256],
)
def test_unsafe_names_are_rejected_before_anything_is_written(store: Store, tmp_path: Path, bad: str) -> None:
    _plant_tree(store, "evil", [("aaa-first", "f", 0o644, b"written first?"), (bad, "f", 0o644, b"evil")])
    dest = tmp_path / "dest"
    dest.mkdir(mode=0o700)
    with pytest.raises(UnsafeTreeError):
        store.get_tree(NS, "evil", dest)
    assert _listing(dest) == []
    assert stat.S_IMODE(dest.stat().st_mode) == 0o700  # '.' did not chmod DEST


@pytest.mark.parametrize(
    "files",
    [
        [("a", "f", 0o644, b"1"), ("a", "f", 0o644, b"2")],  # duplicate
        [("a", "d", 0o755, b""), ("a", "f", 0o644, b"2")],  # duplicate, other type
        [("a", "f", 0o644, b"1"), ("a/b", "f", 0o644, b"2")],  # a file used as a directory
        [("link", "l", 0o777, b"")],  # not a file or directory
    ],
)
def test_inconsistent_trees_are_rejected_before_anything_is_written(store: Store, tmp_path: Path, files: list) -> None:
    dest = tmp_path / "dest"
    _plant_tree(store, "evil", files)
    try:
        restored = store.get_tree(NS, "evil", dest)
    except FormatError:  # UnsafeTreeError
        restored = None
    assert restored is not True  # an error, or a miss (the manifest parser already refuses the entry)
    assert not dest.exists() or _listing(dest) == []


def test_a_symlink_inside_dest_lets_nothing_out(store: Store, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir(mode=0o700)
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "sub").symlink_to(outside)
    _plant_tree(store, "through-dir", [("sub", "d", 0o777, b""), ("sub/planted", "f", 0o644, b"evil")])
    with pytest.raises(UnsafeTreeError):
        store.get_tree(NS, "through-dir", dest)
    _plant_tree(store, "chmod-dir", [("sub", "d", 0o777, b"")])
    with pytest.raises(UnsafeTreeError):
        store.get_tree(NS, "chmod-dir", dest)
    assert list(outside.iterdir()) == []
    assert stat.S_IMODE(outside.stat().st_mode) == 0o700
    # A symlink where a file goes is replaced by the file, never written through.
    target = outside / "target"
    target.write_bytes(b"untouched")
    (dest / "f").symlink_to(target)
    _plant_tree(store, "through-file", [("f", "f", 0o644, b"restored")])
    assert store.get_tree(NS, "through-file", dest)
    assert target.read_bytes() == b"untouched"
    assert not (dest / "f").is_symlink() and (dest / "f").read_bytes() == b"restored"


def test_extract_tree_checks_the_blob_size(tmp_path: Path) -> None:
    m = Manifest(namespace=NS, key="k", size=3, digest=bytes(32), kind="tree", files=[TreeEntry("a", "f", 0o644, 3)])
    with pytest.raises(UnsafeTreeError):
        extract_tree(m, b"toolong", tmp_path / "d")


def test_get_file_drops_unsafe_mode_bits(store: Store, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.write_bytes(b"payload" * 5000)
    store.put_file(NS, "f", src, meta={"mode": 0o6777})
    dest = tmp_path / "out"
    assert store.get_file(NS, "f", dest)
    assert stat.S_IMODE(dest.stat().st_mode) == 0o755
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_cli_get_without_dest_takes_no_name_or_mode_from_the_bucket(store: Store, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    store.put(NS, "artifact", b"[s3]\nurl = 'evil'\n", meta={"filename": "castore.toml", "mode": 0o4777})
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    result = CliRunner().invoke(main, ["--url", store.url, "get", NS, "artifact"])
    assert result.exit_code == 0, result.output
    assert os.listdir(work) == ["artifact"]
    assert stat.S_IMODE((work / "artifact").stat().st_mode) & 0o7022 == 0
