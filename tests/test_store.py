"""Store on memory:// and file:// backends."""

from __future__ import annotations

import hashlib
import logging
import random
import stat
import uuid
from pathlib import Path

import pytest

from castore.backends import open_backend
from castore.backends.base import ReadOnlyBackend
from castore.errors import FormatError, InvalidKeyError, ReadOnlyError
from castore.format import keys
from castore.format.manifest import Manifest
from castore.store import Store


def _rand(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


@pytest.fixture(params=["memory", "file"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    url = f"memory://{uuid.uuid4().hex}" if request.param == "memory" else f"file://{tmp_path / 'store'}"
    s = Store(open_backend(url), workers=4)
    yield s
    s.close()


def _chunk_paths(store: Store) -> list[str]:
    return [p for p, _ in store.backend.list(keys.ROOT + "/chunks/")]


# -- put / get --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [0, 1, 16 << 10, (16 << 10) + 1, 300_000, 2 << 20])
def test_round_trip_sizes(store: Store, size: int) -> None:
    data = _rand(size, seed=size)
    result = store.put("ns", "k", data)
    assert result.published
    assert store.get("ns", "k") == data
    m = store.stat("ns", "k")
    assert m is not None and m.size == size and m.digest == hashlib.sha256(data).digest()
    assert (m.inline is not None) == (size <= 16 << 10)


def test_miss_returns_none(store: Store, tmp_path: Path) -> None:
    assert store.get("ns", "absent") is None
    assert store.stat("ns", "absent") is None
    assert not store.contains("ns", "absent")
    assert store.get_file("ns", "absent", tmp_path / "x") is False
    assert not (tmp_path / "x").exists()
    assert store.stats.misses == 2


def test_dedup_counters_and_shared_chunks(store: Store) -> None:
    data = _rand(1 << 20, seed=7)
    first = store.put("ns", "a", data)
    assert first.chunks_uploaded == first.chunks_total > 1
    second = store.put("ns", "b", data)
    assert second.chunks_uploaded == 0 and second.bytes_uploaded == 0
    assert store.stats.chunks_deduplicated == second.chunks_total
    assert store.stats.chunks_uploaded == first.chunks_total
    assert len(_chunk_paths(store)) == first.chunks_total
    # A 1-byte edit re-uploads only a few chunks.
    edited = data[:500_000] + b"!" + data[500_000:]
    third = store.put("ns", "c", edited)
    assert third.chunks_uploaded <= 3
    assert store.get("ns", "c") == edited


def test_first_writer_wins_without_overwrite(store: Store) -> None:
    assert store.put("ns", "k", b"first").published
    again = store.put("ns", "k", b"second")
    assert not again.published
    assert store.get("ns", "k") == b"first"
    assert store.put("ns", "k", b"third", overwrite=True).published
    assert store.get("ns", "k") == b"third"


def test_meta_is_kept(store: Store) -> None:
    store.put("ns", "k", b"x", meta={"a": "1", "n": 3, "obj": Path("/p")})
    m = store.stat("ns", "k")
    assert m is not None
    assert m.meta["a"] == "1" and m.meta["n"] == 3 and m.meta["obj"] == "/p"


def test_get_many(store: Store) -> None:
    blobs = {f"k{i}": _rand(50_000 * i + 10, seed=i) for i in range(5)}
    blobs["shared"] = blobs["k4"]
    for k, v in blobs.items():
        store.put("ns", k, v)
    got = store.get_many("ns", [*blobs, "missing", "k1"])
    assert got.pop("missing") is None
    assert got == blobs


def test_put_file_get_file_keeps_mode(store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(_rand(100_000))
    src.chmod(0o751)
    store.put_file("ns", "f", src)
    m = store.stat("ns", "f")
    assert m is not None and m.meta["filename"] == "src.bin" and m.meta["mode"] == 0o751
    dest = tmp_path / "out" / "dest.bin"
    assert store.get_file("ns", "f", dest)
    assert dest.read_bytes() == src.read_bytes()
    assert stat.S_IMODE(dest.stat().st_mode) == 0o751
    # A bare file name goes to the current directory.
    monkeypatch.chdir(tmp_path)
    assert store.get_file("ns", "f", "bare.bin")
    assert (tmp_path / "bare.bin").read_bytes() == src.read_bytes()


def _make_tree(root: Path) -> dict[str, tuple[bytes, int]]:
    files = {
        "a.txt": (b"alpha\n", 0o644),
        "bin/run": (b"#!/bin/sh\necho hi\n", 0o755),
        "bin/secret": (b"s3cr3t", 0o600),
        "deep/er/big.bin": (_rand(200_000, seed=9), 0o640),
        "empty": (b"", 0o644),
    }
    for rel, (content, mode) in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content)
        p.chmod(mode)
    (root / "emptydir").mkdir()
    return files


def test_put_tree_get_tree_keeps_contents_and_modes(store: Store, tmp_path: Path) -> None:
    src = tmp_path / "src"
    files = _make_tree(src)
    result = store.put_tree("ns", "tree", src)
    assert result.manifest.kind == "tree"
    dest = tmp_path / "dest"
    assert store.get_tree("ns", "tree", dest)
    for rel, (content, mode) in files.items():
        assert (dest / rel).read_bytes() == content
        assert stat.S_IMODE((dest / rel).stat().st_mode) == mode, rel
    assert (dest / "emptydir").is_dir()
    assert store.get_tree("ns", "absent", tmp_path / "nope") is False
    store.put("ns", "blob", b"x")
    with pytest.raises(FormatError):
        store.get_tree("ns", "blob", tmp_path / "nope")


def test_delete_and_list(store: Store) -> None:
    store.put("a", "k1", b"1")
    store.put("a", "k2", b"2")
    store.put("b", "k1", b"3")
    assert sorted((ns, k) for ns, k, _ in store.list()) == [("a", "k1"), ("a", "k2"), ("b", "k1")]
    assert sorted(k for _, k, _ in store.list("a")) == ["k1", "k2"]
    assert store.namespaces() == ["a", "b"]
    assert store.delete("a", "k1") is True
    assert store.delete("a", "k1") is False
    assert store.get("a", "k1") is None
    assert sorted(k for _, k, _ in store.list("a")) == ["k2"]


@pytest.mark.parametrize("bad", ["..", "a/b", "/", "a\x00b", "k" * 10_000])
def test_invalid_keys_rejected_everywhere(store: Store, bad: str, tmp_path: Path) -> None:
    with pytest.raises(InvalidKeyError):
        store.put("ns", bad, b"x")
    with pytest.raises(InvalidKeyError):
        store.put(bad, "k", b"x")
    with pytest.raises(InvalidKeyError):
        store.get("ns", bad)
    with pytest.raises(InvalidKeyError):
        store.stat("ns", bad)
    with pytest.raises(InvalidKeyError):
        store.delete("ns", bad)
    assert not list(tmp_path.rglob("*x*"))


def test_read_only_refuses_writes(tmp_path: Path) -> None:
    url = f"file://{tmp_path / 'store'}"
    with Store(open_backend(url)) as rw:
        rw.put("ns", "k", _rand(100_000))
    ro = Store(ReadOnlyBackend(open_backend(url)), read_only=True)
    with pytest.raises(ReadOnlyError):
        ro.put("ns", "k2", b"x")
    with pytest.raises(ReadOnlyError):
        ro.put_tree("ns", "t", tmp_path)
    with pytest.raises(ReadOnlyError):
        ro.delete("ns", "k")
    with pytest.raises(ReadOnlyError):
        ro.backend.put("castore/v1/x", b"x")
    assert ro.get("ns", "k") == _rand(100_000)
    assert ro.verify().ok
    assert [k for _, k, _ in ro.list()] == ["k"]


# -- corruption -------------------------------------------------------------------------------------------
def test_corrupt_chunk_is_a_miss_with_warning(store: Store, caplog: pytest.LogCaptureFixture) -> None:
    data = _rand(300_000, seed=5)
    store.put("ns", "k", data)
    path = _chunk_paths(store)[0]
    obj = bytearray(store.backend.get(path))
    obj[-10] ^= 0x01
    store.backend.put(path, bytes(obj))
    with caplog.at_level(logging.WARNING, logger="castore"):
        assert store.get("ns", "k") is None
        assert store.get_many("ns", ["k"]) == {"k": None}
    assert any("verification" in r.getMessage() or "corrupt" in r.getMessage() for r in caplog.records)
    assert store.stats.corrupt >= 1
    report = store.verify()
    assert not report.ok and any(path.rsplit("/", 1)[1] in b for b in report.bad)
    assert not store.verify("ns", "k").ok


def test_missing_chunk_is_a_miss(store: Store, caplog: pytest.LogCaptureFixture) -> None:
    store.put("ns", "k", _rand(300_000, seed=6))
    store.backend.delete(_chunk_paths(store)[-1])
    with caplog.at_level(logging.WARNING, logger="castore"):
        assert store.get("ns", "k") is None
    assert any("missing" in r.getMessage() for r in caplog.records)
    assert any("missing" in b for b in store.verify().bad)


def test_chunks_swapped_in_manifest_never_return_wrong_bytes(store: Store, caplog: pytest.LogCaptureFixture) -> None:
    data = _rand(400_000, seed=8)
    store.put("ns", "k", data)
    m = store.stat("ns", "k")
    assert m is not None and len(m.chunks) >= 2
    m.chunks[0], m.chunks[1] = m.chunks[1], m.chunks[0]
    lying = Manifest.from_bytes(m.to_bytes(), max_size=1 << 30)  # still self-consistent
    store.backend.put(keys.manifest_path("ns", "k"), lying.to_bytes())
    with caplog.at_level(logging.WARNING, logger="castore"):
        assert store.get("ns", "k") is None
    assert any("digest mismatch" in r.getMessage() for r in caplog.records)


def test_corrupt_manifest_is_a_miss(store: Store, caplog: pytest.LogCaptureFixture) -> None:
    store.put("ns", "k", b"hello")
    store.backend.put(keys.manifest_path("ns", "k"), b"\xc1garbage")
    with caplog.at_level(logging.WARNING, logger="castore"):
        assert store.get("ns", "k") is None
    assert any("unusable manifest" in r.getMessage() for r in caplog.records)
    with pytest.raises(FormatError):
        store.stat("ns", "k")
    assert not store.verify().ok


def test_corrupt_inline_data_is_a_miss(store: Store, caplog: pytest.LogCaptureFixture) -> None:
    store.put("ns", "k", b"hello inline world")
    m = store.stat("ns", "k")
    assert m is not None and m.inline is not None
    m.inline = m.inline[:-1] + bytes([m.inline[-1] ^ 1])
    store.backend.put(keys.manifest_path("ns", "k"), m.to_bytes())
    with caplog.at_level(logging.WARNING, logger="castore"):
        assert store.get("ns", "k") is None
    assert not store.verify("ns", "k").ok


def test_verify_whole_store_checks_orphan_chunks(store: Store) -> None:
    store.put("ns", "k", _rand(300_000, seed=11))
    n = len(_chunk_paths(store))
    store.delete("ns", "k")
    report = store.verify()
    assert report.ok and report.chunks == n and report.manifests == 0
    path = _chunk_paths(store)[0]
    obj = bytearray(store.backend.get(path))
    obj[5] ^= 0xFF
    store.backend.put(path, bytes(obj))
    assert not store.verify().ok


# -- du ---------------------------------------------------------------------------------------------------
def test_du_reports_dedup_and_compression(store: Store) -> None:
    random_blob = _rand(500_000, seed=12)
    text_blob = b"".join(b"line %d of a very repetitive generated file\n" % (i % 50) for i in range(20_000))
    store.put("a", "r1", random_blob)
    store.put("a", "r2", random_blob)  # full duplicate
    store.put("b", "t", text_blob)
    usage = store.du()
    assert usage.manifests == 3
    assert usage.logical_bytes == 2 * len(random_blob) + len(text_blob)
    assert usage.referenced_bytes == len(random_blob) + len(text_blob)
    assert usage.dedup_ratio == pytest.approx(usage.logical_bytes / usage.referenced_bytes)
    chunk_bytes = sum(size for _, size in store.backend.list(keys.ROOT + "/chunks/"))
    manifest_bytes = sum(size for _, size in store.backend.list(keys.ROOT + "/manifests/"))
    assert usage.stored_bytes == chunk_bytes + manifest_bytes
    assert usage.stored_bytes < len(random_blob) + len(text_blob) // 5
    only_b = store.du("b")
    assert only_b.manifests == 1 and only_b.logical_bytes == len(text_blob)
    assert only_b.compression_ratio > 5
