"""castore against a real S3 server: SeaweedFS on 127.0.0.1, started once per session (tests/conftest.py)."""

from __future__ import annotations

import hashlib
import os
import random
import socket
import stat
import threading
import time
import tracemalloc
from urllib.parse import urlsplit

import msgpack
import pytest
import zstandard

import castore
from castore.backends.s3 import S3Backend
from castore.errors import (
    BackendError,
    BackendUnavailable,
    FormatError,
    InvalidKeyError,
    ManifestError,
    UnsupportedFormatVersion,
)
from castore.format import chunking, keys
from castore.format import codec as codecs
from castore.format.manifest import FORMAT_VERSION, ChunkRef, Manifest

pytestmark = pytest.mark.s3
NS = "ns"


def _data(size: int, seed: int = 0) -> bytes:
    """Half random, half text: chunks that compress and chunks that don't, cut at content-defined points."""
    rnd = random.Random(seed)
    out = bytearray()
    while len(out) < size:
        out += rnd.randbytes(rnd.randrange(1, 64 << 10))
        out += b"def kernel_%d(x): return x * %d\n" % (rnd.randrange(1 << 30), rnd.randrange(100)) * rnd.randrange(1, 2000)
    return bytes(out[:size])


def _direct(url: str, **kw: object) -> castore.Store:
    """A store that talks to the bucket only (no local layer)."""
    return castore.open_store(url, cache_size=0, **kw)


class Bucket:
    """Raw access to the bucket behind a castore s3:// URL, to look at and damage what castore wrote."""

    def __init__(self, seaweedfs, url: str) -> None:  # noqa: ANN001
        parts = urlsplit(url)
        self.name = parts.netloc
        self.prefix = parts.path.strip("/") + "/"
        self.client = seaweedfs.client()

    def keys(self, under: str = "") -> dict[str, int]:
        out = {}
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.name, Prefix=self.prefix + under):
            for obj in page.get("Contents", []):
                out[obj["Key"][len(self.prefix) :]] = obj["Size"]
        return out

    def get(self, path: str) -> bytes:
        return self.client.get_object(Bucket=self.name, Key=self.prefix + path)["Body"].read()

    def put(self, path: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.name, Key=self.prefix + path, Body=data)

    def delete(self, path: str) -> None:
        self.client.delete_object(Bucket=self.name, Key=self.prefix + path)


@pytest.fixture
def bucket(seaweedfs, s3_url: str) -> Bucket:  # noqa: ANN001
    b = Bucket(seaweedfs, s3_url)
    yield b
    b.client.close()


@pytest.fixture
def store(s3_url: str):  # noqa: ANN201
    with _direct(s3_url) as s:
        yield s


# -- the S3Backend itself ----------------------------------------------------------------------------------
def test_backend_put_get_exists_list_delete(s3_url: str, bucket: Bucket) -> None:
    with S3Backend(s3_url) as be:
        assert be.get("a/missing") is None
        assert be.exists("a/missing") is False
        assert be.put("a/one", b"1") is True
        assert be.put("a/two", b"22") is True
        assert be.put("b/three", b"333") is True
        assert be.get("a/one") == b"1"
        assert be.exists("a/two") is True
        assert sorted(be.list("a/")) == [("a/one", 1), ("a/two", 2)]
        assert sorted(be.list("")) == [("a/one", 1), ("a/two", 2), ("b/three", 3)]
        # The URL prefix is where the objects are, and list() strips it again.
        assert set(bucket.keys()) == {"a/one", "a/two", "b/three"}
        assert be.put("a/one", b"replaced") is True
        assert be.get("a/one") == b"replaced"
        be.delete("a/one")
        be.delete("a/one")  # deleting a missing object is not an error
        assert be.get("a/one") is None
        assert sorted(be.list("a/")) == [("a/two", 2)]


def test_backend_if_absent_is_honoured(s3_url: str) -> None:
    """SeaweedFS must answer IfNoneMatch='*' with 412, or the first-writer-wins manifest publish is a lie."""
    with S3Backend(s3_url) as be:
        assert be.put("m", b"first", if_absent=True) is True
        assert be.put("m", b"second", if_absent=True) is False
        assert be.get("m") == b"first"
        assert be.put("m", b"third") is True  # without if_absent it overwrites
        assert be.get("m") == b"third"


def test_backend_lists_more_than_one_page(s3_url: str) -> None:
    """S3 answers a listing 1,000 keys at a time: 1,005 objects take two pages, continued by token."""
    from concurrent.futures import ThreadPoolExecutor

    with S3Backend(s3_url, list_page_size=7) as be:
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda i: be.put(f"p/{i:04d}", bytes(i % 7)), range(1005)))
        be.put("q/after", b"x")
        assert list(be.list("p/")) == [(f"p/{i:04d}", i % 7) for i in range(1005)]
        assert [p for p, _ in be.list("p/100")] == [f"p/{i:04d}" for i in range(1000, 1005)]


def test_backend_missing_bucket_is_an_error_not_a_miss(seaweedfs, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    for name, value in seaweedfs.env().items():
        monkeypatch.setenv(name, value)
    url = seaweedfs.url("castore-no-such-bucket-" + os.urandom(4).hex(), "x")
    with S3Backend(url, max_attempts=1) as be:
        with pytest.raises(BackendError):
            be.get("some/object")
        with pytest.raises(BackendError):
            be.put("some/object", b"x")
        with pytest.raises(BackendError):
            list(be.list(""))


def test_backend_bad_credentials_are_an_error_not_a_miss(s3_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with S3Backend(s3_url) as be:
        be.put("obj", b"x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    with S3Backend(s3_url, max_attempts=1) as be:
        with pytest.raises(BackendError) as info:
            be.get("obj")
        assert not isinstance(info.value, BackendUnavailable)


# -- blobs, files, trees through open_store ---------------------------------------------------------------
def test_blob_roundtrip_contains_list_delete(store: castore.Store, bucket: Bucket) -> None:
    small, big = b"tiny inline blob", _data(300 << 10, seed=1)
    assert store.get(NS, "small") is None
    assert store.contains(NS, "small") is False
    r1 = store.put(NS, "small", small, meta={"origin": "test"})
    r2 = store.put(NS, "pt2:fx-graph-v1::fabc:c1", big)
    assert r1.published and r2.published
    assert r1.manifest.inline is not None and r1.chunks_total == 0  # small blobs live in the manifest
    assert r2.chunks_total > 1 and r2.chunks_uploaded == r2.chunks_total
    assert store.get(NS, "small") == small
    assert store.get(NS, "pt2:fx-graph-v1::fabc:c1") == big
    assert store.contains(NS, "small") and store.contains(NS, "pt2:fx-graph-v1::fabc:c1")
    assert store.stat(NS, "small").meta["origin"] == "test"
    assert sorted(k for _, k, _ in store.list(NS)) == ["pt2:fx-graph-v1::fabc:c1", "small"]
    assert store.namespaces() == [NS]
    objects = bucket.keys()
    assert keys.manifest_path(NS, "small") in objects
    assert sum(1 for k in objects if k.startswith("castore/v1/chunks/")) == r2.chunks_uploaded
    assert store.delete(NS, "small") is True
    assert store.delete(NS, "small") is False
    assert store.get(NS, "small") is None
    assert not store.contains(NS, "small")
    assert store.get(NS, "pt2:fx-graph-v1::fabc:c1") == big


@pytest.mark.parametrize(
    ("size", "params"),
    [(256 << 10, chunking.SMALL), (5 << 20, chunking.MEDIUM), (40 << 20, chunking.LARGE)],
    ids=["256KiB", "5MiB", "40MiB"],
)
def test_blob_sizes_and_chunker_classes(store: castore.Store, bucket: Bucket, size: int, params: chunking.ChunkerParams) -> None:
    data = _data(size // 2, seed=size) + random.Random(size).randbytes(size - size // 2)  # compressible, then not
    result = store.put(NS, f"blob-{size}", data)
    manifest = result.manifest
    assert manifest.chunker == params
    assert sum(c.size for c in manifest.chunks) == size
    assert all(c.size <= params.max_size for c in manifest.chunks)
    if size > 1 << 20:
        assert {c.codec for c in manifest.chunks} == {"raw", "zstd"}  # the mix compresses in places only
    stored = bucket.keys("castore/v1/chunks/")
    for ref in manifest.chunks:
        assert stored[keys.chunk_path(ref.digest)] == ref.stored_size
    got = store.get(NS, f"blob-{size}")
    assert got is not None and len(got) == size and hashlib.sha256(got).digest() == hashlib.sha256(data).digest()


def test_dedup_second_put_uploads_nothing(store: castore.Store, bucket: Bucket) -> None:
    data = _data(900 << 10, seed=7)  # under 1 MiB: 64 KiB chunks
    first = store.put(NS, "a", data)
    assert first.chunks_uploaded == first.chunks_total > 5
    objects_before = bucket.keys("castore/v1/chunks/")
    second = store.put(NS, "b", data)
    assert second.published
    assert second.chunks_uploaded == 0 and second.bytes_uploaded == 0
    assert bucket.keys("castore/v1/chunks/") == objects_before
    # An edit in the middle re-uploads only the chunks around it (content-defined cut points).
    edited = data[: 450 << 10] + b"an edit in the middle" + data[450 << 10 :]
    third = store.put(NS, "c", edited)
    assert 0 < third.chunks_uploaded <= 3
    assert store.get(NS, "c") == edited
    assert store.stats.chunks_deduplicated >= second.chunks_total


def test_put_file_and_get_file_keep_mode(store: castore.Store, tmp_path) -> None:  # noqa: ANN001
    src = tmp_path / "kernel.so"
    src.write_bytes(_data(100 << 10, seed=3))
    src.chmod(0o751)
    assert store.put_file(NS, "so", src).published
    dest = tmp_path / "out" / "kernel.so"
    dest.parent.mkdir()
    assert store.get_file(NS, "so", dest) is True
    assert dest.read_bytes() == src.read_bytes()
    assert stat.S_IMODE(dest.stat().st_mode) == 0o751
    assert store.get_file(NS, "absent", tmp_path / "nothing") is False
    assert not (tmp_path / "nothing").exists()


def test_put_tree_and_get_tree_keep_layout_and_modes(store: castore.Store, tmp_path) -> None:  # noqa: ANN001
    src = tmp_path / "src"
    (src / "sub" / "deeper").mkdir(parents=True)
    (src / "empty-dir").mkdir()
    files = {
        "a.py": (b"print('a')\n" * 100, 0o644),
        "run.sh": (b"#!/bin/sh\necho hi\n", 0o755),
        "sub/big.bin": (_data(700 << 10, seed=5), 0o600),
        "sub/deeper/empty": (b"", 0o640),
    }
    for rel, (content, mode) in files.items():
        (src / rel).write_bytes(content)
        (src / rel).chmod(mode)
    (src / "sub").chmod(0o750)
    assert store.put_tree(NS, "tree", src).published
    dest = tmp_path / "dest"
    assert store.get_tree(NS, "tree", dest) is True
    for rel, (content, mode) in files.items():
        assert (dest / rel).read_bytes() == content, rel
        assert stat.S_IMODE((dest / rel).stat().st_mode) == mode, rel
    assert (dest / "empty-dir").is_dir()
    assert stat.S_IMODE((dest / "sub").stat().st_mode) == 0o750
    store.put(NS, "not-a-tree", b"blob")
    with pytest.raises(FormatError):
        store.get_tree(NS, "not-a-tree", tmp_path / "x")
    assert store.get_tree(NS, "absent", tmp_path / "y") is False


def test_get_many(store: castore.Store) -> None:
    shared = _data(400 << 10, seed=11)
    blobs = {"k1": shared, "k2": shared + b"tail", "k3": b"inline", "k4": _data(200 << 10, seed=12)}
    for k, v in blobs.items():
        store.put(NS, k, v)
    got = store.get_many(NS, ["k1", "missing", "k2", "k3", "k4", "k1"])
    assert got == {**blobs, "missing": None}


def test_local_layer_in_front_of_s3_serves_second_read_locally(s3_url: str, tmp_path) -> None:  # noqa: ANN001
    data = _data(1 << 20, seed=21)
    with _direct(s3_url) as writer:
        writer.put(NS, "k", data)
    with castore.open_store(s3_url, cache_dir=str(tmp_path / "layer"), cache_size=1 << 30) as reader:
        assert reader.local is not None
        assert reader.get(NS, "k") == data
        first_misses = reader.local.stats.misses
        assert first_misses > 1  # manifest + chunks fetched from the bucket
        assert reader.get(NS, "k") == data
        assert reader.local.stats.misses == first_misses  # nothing fetched the second time


# -- conditional publish --------------------------------------------------------------------------------
def test_racing_writers_exactly_one_publishes(s3_url: str) -> None:
    stores = [_direct(s3_url), _direct(s3_url)]
    try:
        for round_ in range(4):
            key = f"race-{round_}"
            datas = [_data(600 << 10, seed=100 + 2 * round_ + i) for i in range(2)]
            barrier = threading.Barrier(2)
            results: list = [None, None]

            def write(i: int) -> None:
                barrier.wait(timeout=10)
                results[i] = stores[i].put(NS, key, datas[i])

            threads = [threading.Thread(target=write, args=(i,)) for i in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=60)
            assert sorted(r.published for r in results) == [False, True], round_
            winner = [r.published for r in results].index(True)
            for s in stores:
                assert s.get(NS, key) == datas[winner]  # whole, and the winner's
        # overwrite=True replaces a published key
        assert stores[0].put(NS, "race-0", b"over" * 10000, overwrite=True).published
        assert stores[1].get(NS, "race-0") == b"over" * 10000
    finally:
        for s in stores:
            s.close()


# -- damaged objects: a miss or a typed error, never wrong bytes -----------------------------------------
@pytest.fixture
def entry(store: castore.Store):  # noqa: ANN201
    data = _data(400 << 10, seed=42)
    result = store.put(NS, "victim", data)
    assert len(result.manifest.chunks) >= 3
    return data, result.manifest


def _assert_miss(store: castore.Store) -> None:
    assert store.get(NS, "victim") is None
    assert store.get_many(NS, ["victim"]) == {"victim": None}


def test_flipped_byte_in_chunk_is_a_miss(store: castore.Store, bucket: Bucket, entry) -> None:  # noqa: ANN001
    _, manifest = entry
    path = keys.chunk_path(manifest.chunks[1].digest)
    obj = bytearray(bucket.get(path))
    obj[len(obj) // 2] ^= 0x01
    bucket.put(path, bytes(obj))
    _assert_miss(store)
    assert store.stats.corrupt >= 1
    assert not store.verify(NS, "victim").ok


def test_truncated_chunk_is_a_miss(store: castore.Store, bucket: Bucket, entry) -> None:  # noqa: ANN001
    _, manifest = entry
    path = keys.chunk_path(manifest.chunks[0].digest)
    bucket.put(path, bucket.get(path)[:-100])
    _assert_miss(store)


def test_missing_chunk_is_a_miss(store: castore.Store, bucket: Bucket, entry) -> None:  # noqa: ANN001
    _, manifest = entry
    bucket.delete(keys.chunk_path(manifest.chunks[-1].digest))
    _assert_miss(store)
    assert not store.verify(NS, "victim").ok


def test_chunk_replaced_by_another_valid_chunk_is_a_miss(store: castore.Store, bucket: Bucket, entry) -> None:  # noqa: ANN001
    _, manifest = entry
    other, _ = codecs.encode_chunk(b"x" * manifest.chunks[0].size)  # decodes fine, to the wrong bytes
    bucket.put(keys.chunk_path(manifest.chunks[0].digest), other)
    _assert_miss(store)


def test_unknown_chunk_codec_is_a_miss(store: castore.Store, bucket: Bucket, entry) -> None:  # noqa: ANN001
    _, manifest = entry
    path = keys.chunk_path(manifest.chunks[0].digest)
    bucket.put(path, codecs.MAGIC + bytes([0x7F]) + bucket.get(path)[4:])
    _assert_miss(store)


@pytest.mark.parametrize(
    "raw",
    [b"", b"\xc1garbage", msgpack.packb([1, 2, 3]), msgpack.packb({"format": 1, "kind": "blob"})],
    ids=["empty", "not-msgpack", "not-a-map", "missing-fields"],
)
def test_malformed_manifest(store: castore.Store, bucket: Bucket, entry, raw: bytes) -> None:  # noqa: ANN001
    bucket.put(keys.manifest_path(NS, "victim"), raw)
    with pytest.raises(ManifestError):
        store.stat(NS, "victim")
    _assert_miss(store)
    assert store.stats.corrupt >= 1


def test_oversized_manifest(store: castore.Store, bucket: Bucket, entry) -> None:  # noqa: ANN001
    bucket.put(keys.manifest_path(NS, "victim"), b"\x00" * ((16 << 20) + 1))
    with pytest.raises(ManifestError, match="limit"):
        store.stat(NS, "victim")
    _assert_miss(store)


def test_unknown_format_version(store: castore.Store, bucket: Bucket, entry) -> None:  # noqa: ANN001
    doc = msgpack.unpackb(bucket.get(keys.manifest_path(NS, "victim")))
    doc["format"] = FORMAT_VERSION + 1
    bucket.put(keys.manifest_path(NS, "victim"), msgpack.packb(doc, use_bin_type=True))
    with pytest.raises(UnsupportedFormatVersion):
        store.stat(NS, "victim")
    _assert_miss(store)


def test_manifest_for_another_key_is_a_miss(store: castore.Store, bucket: Bucket, entry) -> None:  # noqa: ANN001
    store.put(NS, "other", b"the other key's bytes")
    bucket.put(keys.manifest_path(NS, "victim"), bucket.get(keys.manifest_path(NS, "other")))
    with pytest.raises(FormatError):
        store.stat(NS, "victim")
    _assert_miss(store)


def _publish(bucket: Bucket, manifest: Manifest) -> None:
    bucket.put(keys.manifest_path(manifest.namespace, manifest.key), manifest.to_bytes())


def test_manifest_sizes_that_do_not_add_up(store: castore.Store, bucket: Bucket, entry) -> None:  # noqa: ANN001
    _, manifest = entry
    manifest.size += 1
    _publish(bucket, manifest)
    with pytest.raises(ManifestError):
        store.stat(NS, "victim")
    _assert_miss(store)


def test_manifest_chunk_size_lies(store: castore.Store, bucket: Bucket, entry) -> None:  # noqa: ANN001
    """Sizes that add up but lie about single chunks (the bytes decode to another length): a miss."""
    _, manifest = entry
    a, b = manifest.chunks[0], manifest.chunks[1]
    manifest.chunks[0] = ChunkRef(a.digest, a.size - 10, a.stored_size, a.codec)
    manifest.chunks[1] = ChunkRef(b.digest, b.size + 10, b.stored_size, b.codec)
    _publish(bucket, manifest)
    _assert_miss(store)


def test_decompression_bomb_is_a_miss_and_stays_small(store: castore.Store, bucket: Bucket) -> None:
    """A zstd chunk that expands to 100 MB while the manifest says 64 KiB is refused without inflating it."""
    real = os.urandom(64 << 10)
    digest = hashlib.sha256(real).digest()
    bomb = codecs.MAGIC + bytes([1]) + zstandard.ZstdCompressor(level=19).compress(b"\x00" * (100 * 10**6))
    assert len(bomb) < 64 << 10
    bucket.put(keys.chunk_path(digest), bomb)
    half = 32 << 10
    manifest = Manifest(
        namespace=NS,
        key="bomb",
        size=2 * half,
        digest=hashlib.sha256(real).digest(),
        chunks=[ChunkRef(digest, half, len(bomb), "zstd"), ChunkRef(digest, half, len(bomb), "zstd")],
        chunker=chunking.SMALL,
    )
    _publish(bucket, manifest)
    one = Manifest(namespace=NS, key="bomb1", size=64 << 10, digest=digest,
                   chunks=[ChunkRef(digest, 64 << 10, len(bomb), "zstd")], chunker=chunking.SMALL)
    _publish(bucket, one)
    tracemalloc.start()
    try:
        assert store.get(NS, "bomb") is None
        assert store.get(NS, "bomb1") is None
        assert store.get_many(NS, ["bomb1"]) == {"bomb1": None}
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20 << 20, f"decoding the bomb allocated {peak} bytes"


def test_manifest_declaring_a_huge_size_is_refused(s3_url: str, bucket: Bucket) -> None:
    with _direct(s3_url) as small_store:
        small_store.max_blob_size = 1 << 20
        data = _data(2 << 20, seed=9)
        small_store.put(NS, "big", data)
        with pytest.raises(ManifestError):
            small_store.stat(NS, "big")
        assert small_store.get(NS, "big") is None


# -- keys ------------------------------------------------------------------------------------------------
BAD_KEYS = ["..", "a/../b", "a/b", "/abs", "back\\slash", "nul\x00byte", "x" * 10_000, "", "é"]


@pytest.mark.parametrize("key", BAD_KEYS, ids=lambda k: repr(k)[:20])
def test_invalid_keys_raise(store: castore.Store, bucket: Bucket, key: str) -> None:
    with pytest.raises(InvalidKeyError):
        store.put(NS, key, b"data")
    with pytest.raises(InvalidKeyError):
        store.get(NS, key)
    with pytest.raises(InvalidKeyError):
        store.contains(NS, key)
    with pytest.raises(InvalidKeyError):
        store.delete(NS, key)
    with pytest.raises(InvalidKeyError):
        store.put(key, "fine-key", b"data")  # as a namespace too
    assert bucket.keys() == {}


# -- an unreachable server: a typed error within the timeouts --------------------------------------------
def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_endpoint_fails_fast(seaweedfs, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    for name, value in seaweedfs.env().items():
        monkeypatch.setenv(name, value)
    url = f"s3://bucket/prefix?endpoint=http://127.0.0.1:{_closed_port()}"
    with castore.open_store(url, cache_size=0, connect_timeout=1, max_attempts=2) as s:
        for op in (lambda: s.get(NS, "k"), lambda: s.put(NS, "k", _data(100 << 10)), lambda: s.contains(NS, "k")):
            start = time.monotonic()
            with pytest.raises(BackendUnavailable):
                op()
            assert time.monotonic() - start < 20


def test_server_that_never_answers_times_out(seaweedfs, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    """A listener that accepts connections but never replies: the read timeout bounds every call."""
    for name, value in seaweedfs.env().items():
        monkeypatch.setenv(name, value)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        url = f"s3://bucket/prefix?endpoint=http://127.0.0.1:{silent.getsockname()[1]}"
        with S3Backend(url, connect_timeout=1, read_timeout=1, max_attempts=2) as be:
            start = time.monotonic()
            with pytest.raises(BackendError):
                be.get("castore/v1/manifests/ns/k")
            assert time.monotonic() - start < 20
