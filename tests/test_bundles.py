"""Bundles and packs at the store level (file:// stores): versions, pack reuse, verification of every byte."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from castore import bundles
from castore.backends.file import FileBackend
from castore.errors import FormatError
from castore.format import keys
from castore.format.pack import BUNDLE_NAMESPACE, BundleIndex, PackError, pack_path
from castore.store import Store

FP = {"torch": "2.13.0", "python": "3.11"}


def _store(root: Path) -> Store:
    return Store(FileBackend(str(root)))


def _fill(store: Store, n: int, ns: str = "torch-x", size: int = 200_000) -> list[tuple[str, str]]:
    entries = []
    for i in range(n):
        data = os.urandom(size // 2) * 2 if i % 2 else bytes([i]) * 100  # chunked and inline entries
        store.put(ns, f"k{i}", data)
        entries.append((ns, f"k{i}"))
    return entries


def test_publish_resolves_newest_and_keeps_older_versions(tmp_path: Path) -> None:
    store = _store(tmp_path / "s")
    entries = _fill(store, 4)
    first = bundles.publish(store, "job", entries, FP)
    assert first.published and first.bundle.version == 1 and first.packs_written == 1
    assert first.bundle.manifest.kind == "bundle" and first.bundle.entries == sorted(entries)
    assert bundles.open_bundle(store, "job").fingerprint == FP

    again = bundles.publish(store, "job", entries, FP)
    assert not again.published and again.bundle.version == 1, "an unchanged closure must not make a new version"

    more = entries + _fill(store, 2, ns="other")
    second = bundles.publish(store, "job", more, FP)
    assert second.published and second.bundle.version == 2
    assert second.objects_reused == len(first.bundle.index.manifests) + len(first.bundle.index.chunks)
    assert len(second.bundle.index.packs) == 2, "the new version references the old pack and one new pack"
    assert bundles.versions(store, "job") == [1, 2]
    assert bundles.open_bundle(store, "job").version == 2
    assert bundles.open_bundle(store, "job@1").entries == sorted(entries)
    with pytest.raises(bundles.BundleNotFound):
        bundles.open_bundle(store, "job@7")
    with pytest.raises(bundles.BundleNotFound):
        bundles.open_bundle(store, "jo")


def test_pull_copies_a_verified_closure_readable_offline(tmp_path: Path) -> None:
    store = _store(tmp_path / "s")
    entries = _fill(store, 6)
    bundles.publish(store, "job", entries, FP)
    dest = FileBackend(str(tmp_path / "pulled"))
    report = bundles.pull(store, bundles.open_bundle(store, "job"), dest)
    assert not report.bad and report.fallback_reads == 0
    assert report.ranged_reads == 1, "one pack, neighbours coalesced: one ranged read"
    pulled = Store(dest, read_only=True)
    for ns, key in entries:
        assert pulled.get(ns, key) == store.get(ns, key)
    again = bundles.pull(store, bundles.open_bundle(store, "job"), dest)
    assert again.objects == 0 and again.skipped == report.objects, "a second pull fetches nothing"


def test_a_damaged_pack_is_never_trusted(tmp_path: Path) -> None:
    store = _store(tmp_path / "s")
    entries = _fill(store, 4)
    result = bundles.publish(store, "job", entries, FP)
    path = tmp_path / "s" / result.bundle.index.pack_path(0)
    data = bytearray(path.read_bytes())
    for item in result.bundle.index.chunks + result.bundle.index.manifests:  # flip one byte of every object
        data[item.where.offset + item.where.length // 2] ^= 0xFF
    os.chmod(path, 0o644)
    path.write_bytes(bytes(data))

    dest = FileBackend(str(tmp_path / "pulled"))
    report = bundles.pull(store, bundles.open_bundle(store, "job"), dest)
    assert not report.bad and report.fallback_reads == report.objects > 0, "each object re-read from its own path"
    pulled = Store(dest, read_only=True)
    assert all(pulled.get(ns, k) == store.get(ns, k) for ns, k in entries)

    # Now the objects' own copies are gone too: nothing damaged is written, and the pull says what is missing.
    for item in result.bundle.index.chunks:
        (tmp_path / "s" / keys.chunk_path(item.digest)).unlink()
    dest2 = FileBackend(str(tmp_path / "pulled2"))
    report2 = bundles.pull(store, bundles.open_bundle(store, "job"), dest2)
    assert len(report2.bad) == len(result.bundle.index.chunks)
    assert not any(dest2.exists(keys.chunk_path(c.digest)) for c in result.bundle.index.chunks)


def test_publish_refuses_missing_entries(tmp_path: Path) -> None:
    store = _store(tmp_path / "s")
    entries = _fill(store, 2)
    assert bundles.missing_entries(store, entries + [("torch-x", "nope")]) == [("torch-x", "nope")]
    with pytest.raises(FormatError, match="nope"):
        bundles.publish(store, "job", entries + [("torch-x", "nope")], FP)


def test_bundle_index_rejects_bad_locations() -> None:
    index = BundleIndex(packs=[(b"\0" * 32, 100)])
    raw = index.to_bytes()
    assert BundleIndex.from_bytes(raw).packs == index.packs
    import msgpack

    doc = msgpack.unpackb(raw)
    doc["chunks"] = [[b"\1" * 32, 10, 0, 90, 20]]  # runs past the pack's end
    with pytest.raises(PackError):
        BundleIndex.from_bytes(msgpack.packb(doc))
    doc["chunks"] = [[b"\1" * 32, 10, 1, 8, 20]]  # no pack 1
    with pytest.raises(PackError):
        BundleIndex.from_bytes(msgpack.packb(doc))
    with pytest.raises(PackError):
        BundleIndex.from_bytes(b"\xc1garbage")
    assert pack_path(b"\xab" * 32).startswith("castore/v1/packs/ab/")
    assert BUNDLE_NAMESPACE == "bundles"


def test_bundle_names_and_versions() -> None:
    from castore.format.pack import parse_bundle_ref, version_of

    assert parse_bundle_ref("train") == ("train", None)
    assert parse_bundle_ref("train@12") == ("train", 12)
    with pytest.raises(FormatError):
        parse_bundle_ref("train@latest")
    assert version_of("train", "train.12") == 12
    assert version_of("train", "train.gpu.3") is None, "another bundle's key (train.gpu, version 3)"
    assert version_of("train", "train.012") is None and version_of("train", "train.") is None


def test_a_new_version_repacks_what_a_vanished_pack_held(tmp_path: Path) -> None:
    store = _store(tmp_path / "s")
    entries = _fill(store, 4)
    first = bundles.publish(store, "job", entries, FP)
    store.backend.delete(first.bundle.index.pack_path(0))
    again = bundles.publish(store, "job", entries, FP)
    assert again.published and again.objects_reused == 0 and again.packs_written == 1
    report = bundles.pull(store, again.bundle, FileBackend(str(tmp_path / "pulled")))
    assert not report.bad and report.fallback_reads == 0
